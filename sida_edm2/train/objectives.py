"""The per-micro-batch objectives of one SiD / SiDA iteration, written once.

    terms = fake_score_objective(G, F, z, eps, normal, labels, x_real, sigma_init=2.5, lambda_adv_psi=100)
    freeze_fake_score(F, cache_weights=True)
    terms = generator_objective(G, F, teacher, z, eps, uniform, labels, sigma_init=2.5, tmax=0.8, alpha=1,
                                weights=generator_loss_weights("sida", lambda_sid, lambda_adv_theta))
    thaw_fake_score(F)

The Trainer runs these under DeepSpeed (F an engine in the fake-score update, G an engine in the
generator update); the FLOP counter and the memory planner (sida_edm2.plan) run them on the meta device
with plain modules, so the planned computation is the trained one. Each returns the sum over the
micro-batch's finite samples; the caller divides by the per-GPU batch of one optimizer step, steps, and
does the bookkeeping. The mathematics is in docs/ARCHITECTURE.md ("The losses").
"""

import dataclasses

import torch

from sida_edm2.model import speed
from sida_edm2.train.losses import (
    adversarial_generator_loss,
    discriminator_loss,
    fake_score_loss,
    fake_score_sigma,
    finite_sum,
    generator_sigma,
    sid_generator_loss,
)


@dataclasses.dataclass
class FakeScoreTerms:
    loss: torch.Tensor  # DSM + lambda_adv_psi * discriminator, summed over the finite samples
    dsm: torch.Tensor  # the DSM sum alone (detached use only: logging)
    dsm_dropped: torch.Tensor  # non-finite DSM samples left out of the sum
    disc: torch.Tensor | None  # the discriminator sum (None without real data)
    disc_dropped: torch.Tensor | None


@dataclasses.dataclass
class GeneratorTerms:
    loss: torch.Tensor  # w_sid * SiD + w_adv * adversarial, summed over the finite samples
    dropped: torch.Tensor  # non-finite samples left out of the sum
    sid: torch.Tensor  # per-sample SiD term [B] (logging)
    adversarial: torch.Tensor | None  # per-sample adversarial term [B] (None when w_adv is 0)


def fake_score_objective(
    G: torch.nn.Module,  # the generator, in eval mode; run without gradient
    F: torch.nn.Module,  # the fake score in train mode (a DeepSpeed engine or the plain module)
    z: torch.Tensor,  # generator input noise; G sees sigma_init * z
    eps: torch.Tensor,  # diffusion noise, shared by the fake and the real batch
    normal: torch.Tensor,  # standard normal draw [B] of ln sigma
    labels: torch.Tensor | None,  # one-hot labels of both batches
    x_real: torch.Tensor | None,  # real latents: adds the discriminator term (SiDA); None for SiD
    *,
    sigma_init: float,  # the generator's fixed input noise level
    lambda_adv_psi: float,  # weight of the discriminator term
) -> FakeScoreTerms:
    """Fake-score micro-batch (Algorithm 2): logvar-weighted DSM on the noised generator output, plus,
    with real data, the discriminator's BCE of the real and fake batches noised with the same s, eps."""
    with torch.no_grad():
        x_g = G(sigma_init * z, sigma_init, labels)
    sigma = fake_score_sigma(normal)
    s = sigma.reshape(-1, 1, 1, 1)
    x_t = x_g + s * eps
    if x_real is None:
        denoised, logvar = F(x_t, sigma, labels, return_logvar=True)
    else:
        denoised, logits_fake, logvar = F(x_t, sigma, labels, return_logvar=True, output="both")
        logits_real = F(x_real + s * eps, sigma, labels, output="disc")
    dsm, dsm_dropped = finite_sum(fake_score_loss(denoised, x_g, sigma, logvar))
    if x_real is None:
        return FakeScoreTerms(dsm, dsm, dsm_dropped, None, None)
    disc, disc_dropped = finite_sum(discriminator_loss(logits_real, logits_fake, sigma, logvar))
    return FakeScoreTerms(dsm + lambda_adv_psi * disc, dsm, dsm_dropped, disc, disc_dropped)


def freeze_fake_score(F: torch.nn.Module, cache_weights: bool) -> None:
    """The fake score as a frozen function for the generator update: eval mode, no parameter gradients,
    and (cache_weights) its effective weights computed once, as they stay fixed through the update."""
    F.eval().requires_grad_(False)
    speed.cache_effective_weights(F, cache_weights)


def thaw_fake_score(F: torch.nn.Module, keep_cache: bool = False) -> None:
    """Undo freeze_fake_score before its next optimizer step (keep_cache: the planner measures it)."""
    if not keep_cache:
        speed.cache_effective_weights(F, False)
    F.requires_grad_(True)


def generator_objective(
    G: torch.nn.Module,  # the generator in train mode (a DeepSpeed engine or the plain module)
    F: torch.nn.Module,  # the fake score, frozen (freeze_fake_score), called as a plain module
    teacher: torch.nn.Module,  # the frozen teacher
    z: torch.Tensor,  # generator input noise
    eps: torch.Tensor,  # diffusion noise added to the generator output
    uniform: torch.Tensor,  # uniform draw [B] in [0, 1); t = uniform * tmax
    labels: torch.Tensor | None,  # one-hot labels of the generated images
    *,
    sigma_init: float,  # the generator's fixed input noise level
    tmax: float,  # t ~ U(0, tmax)
    alpha: float,  # SiD's alpha
    weights: tuple[float, float],  # (w_sid, w_adv) of the phase (losses.generator_loss_weights)
) -> GeneratorTerms:
    """Generator micro-batch (Algorithm 1): the teacher and the frozen fake score on the noised output;
    gradients reach G only through their inputs and through x_g in the SiD term."""
    w_sid, w_adv = weights
    x_g = G(sigma_init * z, sigma_init, labels)
    sigma = generator_sigma(uniform * tmax)
    x_t = x_g + sigma.reshape(-1, 1, 1, 1) * eps
    d_teacher = teacher(x_t, sigma, labels)
    if w_adv:
        d_fake, logits, logvar = F(x_t, sigma, labels, return_logvar=True, output="both")
    else:
        d_fake, logvar = F(x_t, sigma, labels, return_logvar=True)
    sid = sid_generator_loss(d_teacher, d_fake, x_g, logvar, alpha=alpha)
    per_sample = w_sid * sid
    adversarial = None
    if w_adv:
        adversarial = adversarial_generator_loss(logits, d_teacher, x_g, logvar)
        per_sample = per_sample + w_adv * adversarial
    total, dropped = finite_sum(per_sample)
    return GeneratorTerms(total, dropped, sid, adversarial)
