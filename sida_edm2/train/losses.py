"""SiD / SiDA losses, noise levels and the phase rule as pure functions of tensors.

Everything here follows docs/ARCHITECTURE.md ("The losses": the reference implementation's reductions)
and the paper's Algorithms 1-2 (Appendix B.1). No function calls a network or draws random numbers: the
objectives (sida_edm2.train.objectives) do both and pass the tensors in. Loss functions return one float32
value per sample, shape [B], computed in float32 whatever the input dtype (bf16/fp16 outputs are upcast).

Notation: x_g = generator output, D_phi = teacher denoised, D_psi = fake-score denoised, u = the fake
score's logvar (shape [B], [B,1,1,1] or a single value), lambda(s) = edm_weight(s). Per-sample sums run
over C*H*W. The caller applies lambda_sid / lambda_adv_theta / lambda_adv_psi, drops non-finite samples
with `finite_sum` and divides by the per-GPU batch of one optimizer step.

Coupling across samples: the BCE terms (`discriminator_loss`, `adversarial_generator_loss`) average the
discriminator map over the whole micro-batch, as the paper's eqs. 7 and 10 do ("per-GPU-batch
fakeness"). Each sample's value therefore depends on every sample of the micro-batch, and the result
depends on how the batch is split into micro-batches. A sample with a non-finite logit is left out of
that mean and gets NaN (so `finite_sum` drops and counts it alone); with all logits finite the mean is
the whole map's, the release's value.

Tests: `python -m pytest tests/test_losses.py`
"""

import torch
import torch.nn.functional as F

SIGMA_DATA = 0.5
W_MIN = 1e-5  # lower clamp of the SiD normaliser w, as in the reference
ADV_LOGIT_CLAMP = 10.0  # the generator's adversarial BCE sees logits clamped to [-10, 10]
DISTILLATION_METHODS = ("sid", "sida", "sid2a")
PHASES = ("fake_only", "sid", "sida")


def _per_sample(value: torch.Tensor | float, batch: int, ref: torch.Tensor, name: str) -> torch.Tensor:
    """float32 [B] view of a per-sample quantity given as [B], [B,1,...,1] or a single value."""
    v = torch.as_tensor(value, device=ref.device).float()
    if v.numel() == 1:
        return v.reshape(1).expand(batch)
    if v.ndim >= 1 and v.shape[0] == batch and v.numel() == batch:
        return v.reshape(batch)
    raise ValueError(
        f"{name} must have shape [B], [B,1,1,1] or one element (B={batch}); got {tuple(v.shape)}"
    )


def _sum_chw(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(dim=1)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match: {shapes}")


# ----------------------------------------------------------------------------------------------------
# Noise levels and weights.


def generator_sigma(
    t: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """Karras noise level of the generator update: t=0 -> sigma_min, t=1 -> sigma_max.

    s = (sigma_max^(1/rho) + (1-t) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho. The caller draws
    t ~ U(0, tmax) with tmax 0.8, so s lies in [0.002, 24.41].
    """
    t = torch.as_tensor(t).float()
    hi = sigma_max ** (1 / rho)
    lo = sigma_min ** (1 / rho)
    return (hi + (1 - t) * (lo - hi)) ** rho


def fake_score_sigma(normal: torch.Tensor, p_mean: float = -0.4, p_std: float = 1.0) -> torch.Tensor:
    """Noise level of the fake-score update, ln s ~ N(p_mean, p_std^2), from a standard normal draw."""
    return torch.exp(p_mean + p_std * torch.as_tensor(normal).float())


def edm_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM's loss weight lambda(s) = (s^2 + sd^2) / (s sd)^2 (the DSM weight; its shape is sigma's)."""
    s = torch.as_tensor(sigma).float()
    return (s**2 + sigma_data**2) / (s * sigma_data) ** 2


# ----------------------------------------------------------------------------------------------------
# Fake-score network (psi) losses.


def fake_score_loss(
    denoised: torch.Tensor, x_g: torch.Tensor, sigma: torch.Tensor | float, logvar: torch.Tensor | float
) -> torch.Tensor:
    """Logvar-weighted DSM loss per sample: sum_CHW [lambda(s)/e^u * (D_psi - x_g)^2 + u] (Algorithm 2).

    As in EDM2, u is added per element (C*H*W times per sample), so the optimal u is the log of the
    *mean* weighted squared error: the official teachers' logvar heads (about -2) were trained that way,
    and the fake score starts from them. `denoised` is D_psi(x_g + s*eps); x_g is the (gradient-free)
    generator output. Returns [B] float32.
    """
    _check_same_shape(denoised=denoised, x_g=x_g)
    batch = x_g.shape[0]
    s = _per_sample(sigma, batch, x_g, "sigma")
    u = _per_sample(logvar, batch, x_g, "logvar")
    sq = _sum_chw((denoised.float() - x_g.float()) ** 2)
    return edm_weight(s) / torch.exp(u) * sq + u * x_g[0].numel()


def discriminator_loss(
    logits_real: torch.Tensor,
    logits_fake: torch.Tensor,
    sigma: torch.Tensor | float,
    logvar: torch.Tensor | float,
) -> torch.Tensor:
    """Discriminator loss per sample: lambda(s) * (bce_real + bce_fake) / 2 / e^u (eq. 10, Algorithm 2).

    bce_real = mean over the whole micro-batch map of BCE(logits_real, 1), bce_fake likewise with target
    0, so every sample carries the same batch-mean BCE, weighted by its own lambda(s) and e^u (see the
    module docstring on coupling). A sample with a non-finite real or fake logit is left out of both
    means and gets NaN. lambda_adv_psi is applied by the caller. Returns [B] float32.
    """
    batch = logits_fake.shape[0]
    if logits_real.shape[0] != batch:
        raise ValueError(f"real and fake batches differ: {logits_real.shape[0]} vs {batch}")
    bce, finite = _batch_mean_bce((logits_real, 1.0), (logits_fake, 0.0))
    s = _per_sample(sigma, batch, logits_fake, "sigma")
    u = _per_sample(logvar, batch, logits_fake, "logvar")
    return _nan_where_not(finite, edm_weight(s) * bce / 2 / torch.exp(u))


def _batch_mean_bce(*terms: tuple[torch.Tensor, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over `terms` of the micro-batch-mean BCE(logits, target), bool [B] of samples used).

    A sample with any non-finite logit in any term is left out of every mean (its logits are replaced by
    0 before the BCE, so it gets no gradient, not even NaN); with all samples finite each mean is the
    whole map's, since every sample's map has the same size."""
    finite = torch.stack([torch.isfinite(lg).flatten(1).all(dim=1) for lg, _ in terms]).all(dim=0)
    used = finite.sum().clamp(min=1)
    total = torch.zeros((), device=finite.device)
    for logits, target in terms:
        lg = logits.float()
        safe = torch.where(finite.reshape(-1, *[1] * (lg.ndim - 1)), lg, torch.zeros_like(lg))
        per_sample = F.binary_cross_entropy_with_logits(safe, torch.full_like(safe, target), reduction="none")
        total = total + torch.where(finite, per_sample.flatten(1).mean(dim=1), 0.0).sum() / used
    return total, finite


def _nan_where_not(keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`values` with NaN at the samples not kept: `finite_sum` then drops and counts exactly those."""
    return torch.where(keep, values, torch.full_like(values, float("nan")))


# ----------------------------------------------------------------------------------------------------
# Generator (theta) losses.


def sid_normaliser(d_teacher: torch.Tensor, x_g: torch.Tensor) -> torch.Tensor:
    """w = stopgrad(mean_CHW |x_g - D_phi|) clamped at 1e-5, float32 [B]: the only detached quantity."""
    diff = (x_g.detach().float() - d_teacher.detach().float()).abs()
    return diff.flatten(1).mean(dim=1).clamp(min=W_MIN)


def sid_generator_loss(
    d_teacher: torch.Tensor,
    d_fake: torch.Tensor,
    x_g: torch.Tensor,
    logvar: torch.Tensor | float,
    alpha: float = 1.0,
) -> torch.Tensor:
    """SiD generator term per sample: sum_CHW (D_phi - D_psi)((D_phi - x_g) - alpha(D_phi - D_psi)) / w / e^u.

    Equals Algorithm 1 line 14-15's (1-alpha)||D_phi - D_psi||^2 + (D_phi - D_psi)^T (D_psi - x_g), with
    the reference's normaliser w instead of omega(t) a_t^2 / sigma_t^4. Gradients reach x_g both directly
    (through D_phi - x_g: d/dx_g = -(D_phi - D_psi) / w / e^u) and through D_phi and D_psi, whose inputs
    x_g + s*eps the caller builds with gradient. Only w is detached. Returns [B] float32.
    """
    _check_same_shape(d_teacher=d_teacher, d_fake=d_fake, x_g=x_g)
    batch = x_g.shape[0]
    u = _per_sample(logvar, batch, x_g, "logvar")
    w = sid_normaliser(d_teacher, x_g)
    d_phi, d_psi, xg = d_teacher.float(), d_fake.float(), x_g.float()
    gap = d_phi - d_psi
    return _sum_chw(gap * ((d_phi - xg) - alpha * gap)) / w / torch.exp(u)


def adversarial_generator_loss(
    logits_g: torch.Tensor, d_teacher: torch.Tensor, x_g: torch.Tensor, logvar: torch.Tensor | float
) -> torch.Tensor:
    """Adversarial generator term per sample: C*H*W * BCE(clamp(logits_g, -10, 10), 1) / w / e^u (eq. 7-8).

    The BCE is the mean over the whole micro-batch map, less samples with a non-finite logit (NaN there;
    see the module docstring); the clamp passes no gradient for logits outside [-10, 10], as in the
    reference. Returns [B] float32.
    """
    _check_same_shape(d_teacher=d_teacher, x_g=x_g)
    batch = x_g.shape[0]
    if logits_g.shape[0] != batch:
        raise ValueError(f"logits batch {logits_g.shape[0]} != x_g batch {batch}")
    u = _per_sample(logvar, batch, x_g, "logvar")
    w = sid_normaliser(d_teacher, x_g)
    bce, finite = _batch_mean_bce((logits_g.float().clamp(-ADV_LOGIT_CLAMP, ADV_LOGIT_CLAMP), 1.0))
    chw = x_g[0].numel()
    return _nan_where_not(finite, chw * bce / w / torch.exp(u))


# ----------------------------------------------------------------------------------------------------
# Reduction, phases, weights.


def finite_sum(per_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the finite samples, number of non-finite samples dropped), both 0-d tensors.

    The count stays a tensor (int64) so that no device-to-host sync happens here. Dropped samples get a
    zero gradient from this sum; the caller's non-finite-gradient check still skips the step if NaNs
    upstream poison the parameter gradients.
    """
    finite = torch.isfinite(per_sample)
    total = torch.where(finite, per_sample, torch.zeros_like(per_sample)).sum()
    return total, (~finite).sum()


def training_phase(nimg: int, fake_only_kimg: float, sid_only_kimg: float, method: str) -> str:
    """Phase at `nimg` generator images seen before this iteration: "fake_only", "sid" or "sida".

    As the release does: method "sid" (data-free, no adversarial loss) trains G from the first iteration
    and never enters "sida", whatever the thresholds. "sida" and "sid2a" train only the fake score while
    nimg <= fake_only_kimg*1000, so G first steps once strictly more than 100,000 images were seen (the
    paper's Algorithm 1 writes >=); G trains on the SiD term alone while nimg <= sid_only_kimg*1000, so
    "sida" starts strictly above 200,000. With fake_only_kimg=0 the first iteration (nimg = 0) is the
    only fake-score-only one.
    """
    if method not in DISTILLATION_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {DISTILLATION_METHODS}")
    if method == "sid":
        return "sid"
    if nimg <= fake_only_kimg * 1000:
        return "fake_only"
    if nimg <= sid_only_kimg * 1000:
        return "sid"
    return "sida"


def generator_loss_weights(phase: str, lambda_sid: float, lambda_adv_theta: float) -> tuple[float, float]:
    """(weight of the SiD term, weight of the adversarial term) for the generator update.

    "sid": (lambda_sid, 0); "sida": (0.5*lambda_sid, 0.5*lambda_adv_theta) (eq. 8, Algorithm 1 with b=1).
    "fake_only" raises: in that phase the generator update must be skipped, not computed.
    """
    if phase == "sid":
        return float(lambda_sid), 0.0
    if phase == "sida":
        return 0.5 * lambda_sid, 0.5 * lambda_adv_theta
    if phase == "fake_only":
        raise ValueError("no generator update in the fake_only phase")
    raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
