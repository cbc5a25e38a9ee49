"""FLOPs of one SiDA iteration, counted with torch.utils.flop_counter on the real network and loss code.

    python -m sida_edm2.flops                                   # table for the img512 presets
    python -m sida_edm2.flops --preset edm2-img512-xs --method sid

    from sida_edm2.plan.flops import count_iteration_flops, mfu, H100_SXM_BF16_DENSE_PEAK
    flops = count_iteration_flops("edm2-img512-xs")             # meta device: no memory, < 1 s
    flops.per_image                                             # forward + backward FLOPs per generator image
    mfu(img_per_s * flops.per_image, H100_SXM_BF16_DENSE_PEAK)  # model FLOPs utilisation of one GPU

The counts are *model* FLOPs, always taken on the meta device: activation-checkpointing recomputation
is not counted, and attention counts as its two matmuls forward and four backward (on the meta device
scaled_dot_product_attention runs its math path). Counting on a real device would differ: the counter
misses the CPU's fused attention kernel, and on CUDA it adds flash attention's recomputed QK^T in
backward. The counts are per image and do not depend on the micro-batch.

The iteration replica below (`build_iteration_networks`, `fake_score_pass`, `generator_pass`) repeats the
computation of `sida_edm2.train.trainer.Trainer` - both updates with the same networks, train/eval modes,
frozen parameters, return modes and loss functions - without DeepSpeed, on any device. `sida_edm2.plan.memory`
runs the same replica to measure the activations autograd saves.
"""

import argparse
import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from sida_edm2.model import speed
from sida_edm2.model.networks import SIGMA_INIT, Precond
from sida_edm2.model.presets import PRESETS, get_preset
from sida_edm2.train.losses import (
    adversarial_generator_loss,
    discriminator_loss,
    fake_score_loss,
    fake_score_sigma,
    finite_sum,
    generator_sigma,
    sid_generator_loss,
)

# NVIDIA H100 SXM dense (no sparsity) bf16 tensor-core peak, FLOP/s (the datasheet's 1979 TFLOPS is sparse).
H100_SXM_BF16_DENSE_PEAK = 989.4e12

METHODS = ("sid", "sida")  # sid2a computes exactly what sida does

# Paper Table 7 / DESIGN.md section 5: loss weights of the SiDA phase, t range of the generator update.
_LAMBDA_SID, _LAMBDA_ADV_THETA, _LAMBDA_ADV_PSI, _TMAX = 100.0, 0.01, 100.0, 0.8


def network_kwargs(network: str | dict) -> dict:
    """Precond keyword arguments of a preset name, or a copy of the given kwargs dict."""
    return get_preset(network)["network"] if isinstance(network, str) else dict(network)


# ----------------------------------------------------------------------------------------------------
# The iteration replica.


@dataclasses.dataclass
class IterationNetworks:
    generator: Precond  # G: the teacher's architecture without logvar head, trainable
    fake_score: Precond  # f_psi: with logvar head, trainable
    teacher: Precond  # frozen, always in eval mode, its weights baked (sida_edm2.model.speed)
    cache_fake_score_weights: bool = True  # cache the frozen fake score's weights in the generator pass

    def modules(self) -> tuple[Precond, Precond, Precond]:
        return self.generator, self.fake_score, self.teacher


def build_iteration_networks(
    network: str | dict, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16
) -> IterationNetworks:
    """G, fake score and teacher of a preset (or Precond kwargs) with parameters and compute in `dtype`,
    as the DeepSpeed engines (bf16 working copies) and the half-precision teacher hold them.
    Random weights; on the meta device nothing is allocated."""
    kwargs = network_kwargs(network)
    with torch.device(device):
        nets = IterationNetworks(
            generator=Precond(**{**kwargs, "logvar_channels": 0}),
            fake_score=Precond(**kwargs),
            teacher=Precond(**kwargs),
        )
    for net in nets.modules():
        net.to(dtype=dtype)
        net.compute_dtype = dtype
    nets.teacher.requires_grad_(False).eval()
    speed.bake_effective_weights_(nets.teacher)  # as the training does: the teacher never changes
    return nets


def _one_hot_labels(net: Precond, batch: int, device: torch.device) -> torch.Tensor | None:
    if net.label_dim == 0:
        return None
    return torch.eye(net.label_dim, device=device)[torch.arange(batch, device=device) % net.label_dim]


def _latents(net: Precond, batch: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, device=device)


def fake_score_pass(nets: IterationNetworks, batch: int, method: str = "sida") -> torch.Tensor:
    """Forward of one fake-score micro-batch (Trainer.fake_score_update): G without grad in eval mode,
    the fake score in train mode on the noised fakes (output "both") and, for SiDA, on the noised real
    batch (encoder only). Returns the loss whose backward updates the fake score."""
    G, F = nets.generator, nets.fake_score
    device = next(F.parameters()).device
    labels = _one_hot_labels(G, batch, device)
    G.eval()
    F.train()
    with torch.no_grad():
        x_g = G(SIGMA_INIT * _latents(G, batch, device), SIGMA_INIT, labels)
    sigma = fake_score_sigma(torch.randn(batch, device=device))
    s = sigma.reshape(-1, 1, 1, 1)
    eps = torch.randn_like(x_g)
    if method == "sid":
        denoised, logvar = F(x_g + s * eps, sigma, labels, return_logvar=True)
        return finite_sum(fake_score_loss(denoised, x_g, sigma, logvar))[0]
    denoised, logits_fake, logvar = F(x_g + s * eps, sigma, labels, return_logvar=True, output="both")
    logits_real = F(_latents(G, batch, device) + s * eps, sigma, labels, output="disc")
    dsm = finite_sum(fake_score_loss(denoised, x_g, sigma, logvar))[0]
    disc = finite_sum(discriminator_loss(logits_real, logits_fake, sigma, logvar))[0]
    return dsm + _LAMBDA_ADV_PSI * disc


def generator_pass(nets: IterationNetworks, batch: int, method: str = "sida") -> torch.Tensor:
    """Forward of one generator micro-batch (Trainer.generator_update): G in train mode, the teacher and
    the fake score (eval mode, parameters frozen) on the noised output. Returns the loss whose backward
    reaches G through the inputs of both frozen networks."""
    G, F, teacher = nets.generator, nets.fake_score, nets.teacher
    device = next(G.parameters()).device
    labels = _one_hot_labels(G, batch, device)
    G.train()
    x_g = G(SIGMA_INIT * _latents(G, batch, device), SIGMA_INIT, labels)
    sigma = generator_sigma(torch.rand(batch, device=device) * _TMAX)
    x_t = x_g + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x_g)
    d_teacher = teacher(x_t, sigma, labels)
    # The graph records the frozen state while it is built, so requires_grad can be restored right after.
    F.eval().requires_grad_(False)
    # The training caches the frozen fake score's effective weights during its generator update; here
    # the cache stays filled after the pass (sida_edm2.plan.activations measures it) until the next one.
    speed.cache_effective_weights(F, nets.cache_fake_score_weights)
    try:
        if method == "sid":
            d_fake, logvar = F(x_t, sigma, labels, return_logvar=True)
        else:
            d_fake, logits, logvar = F(x_t, sigma, labels, return_logvar=True, output="both")
    finally:
        F.requires_grad_(True)
    if method == "sid":
        return finite_sum(_LAMBDA_SID * sid_generator_loss(d_teacher, d_fake, x_g, logvar))[0]
    per_sample = 0.5 * _LAMBDA_SID * sid_generator_loss(d_teacher, d_fake, x_g, logvar)
    adversarial = adversarial_generator_loss(logits, d_teacher, x_g, logvar)
    per_sample = per_sample + 0.5 * _LAMBDA_ADV_THETA * adversarial
    return finite_sum(per_sample)[0]


PASSES = {"fake_score_update": fake_score_pass, "generator_update": generator_pass}


# ----------------------------------------------------------------------------------------------------
# Counting.


@dataclasses.dataclass(frozen=True)
class IterationFlops:
    """FLOPs per generator image of one SiDA iteration, split by update and direction."""

    forward_per_image: float  # one denoiser forward (output "denoised"), the unit of forward-equivalents
    fake_score_forward: float
    fake_score_backward: float
    generator_forward: float
    generator_backward: float

    @property
    def per_image(self) -> float:
        fake_score = self.fake_score_forward + self.fake_score_backward
        return fake_score + self.generator_forward + self.generator_backward

    @property
    def forward_equivalents(self) -> float:
        return self.per_image / self.forward_per_image


def count_forward_flops(network: str | dict, batch: int = 2) -> float:
    """FLOPs per image of one denoiser forward (output "denoised", no logvar) of a preset or kwargs."""
    meta = torch.device("meta")
    with meta:
        net = Precond(**network_kwargs(network))
    net.compute_dtype = torch.bfloat16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(_latents(net, batch, meta), torch.ones(batch, device=meta), _one_hot_labels(net, batch, meta))
    return counter.get_total_flops() / batch


def count_iteration_flops(network: str | dict, batch: int = 2, method: str = "sida") -> IterationFlops:
    """Forward and backward FLOPs per generator image of one iteration (both updates, the SiDA phase
    for method "sida"; SiD's computation for "sid"), counted on the iteration replica."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    nets = build_iteration_networks(network, "meta", torch.bfloat16)
    counts = {}
    for name, run_pass in PASSES.items():
        with FlopCounterMode(display=False) as forward:
            loss = run_pass(nets, batch, method)
        with FlopCounterMode(display=False) as backward:
            loss.backward()
        counts[f"{name}/forward"] = forward.get_total_flops()
        counts[f"{name}/backward"] = backward.get_total_flops()
    return IterationFlops(
        forward_per_image=count_forward_flops(network, batch),
        fake_score_forward=counts["fake_score_update/forward"] / batch,
        fake_score_backward=counts["fake_score_update/backward"] / batch,
        generator_forward=counts["generator_update/forward"] / batch,
        generator_backward=counts["generator_update/backward"] / batch,
    )


def mfu(flops_per_s: float, peak_flops: float = H100_SXM_BF16_DENSE_PEAK) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak FLOP/s."""
    return flops_per_s / peak_flops


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FLOPs of one SiDA iteration per generator image")
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="preset(s) to count; default: the six img512 sizes")  # fmt: skip
    parser.add_argument("--method", default="sida", choices=METHODS)
    args = parser.parse_args(argv)
    presets = args.preset or [name for name in PRESETS if name.startswith("edm2-img512-")]
    print(f"{'preset':<18} {'fwd GF/img':>10} {'iter GF/img':>11} {'fwd-equiv':>9}  "
          "fake-score update fwd/bwd, generator update fwd/bwd (GF/img)")  # fmt: skip
    for name in presets:
        f = count_iteration_flops(name, method=args.method)
        g = {key: value / 1e9 for key, value in dataclasses.asdict(f).items()}
        print(f"{name:<18} {g['forward_per_image']:>10.1f} {f.per_image / 1e9:>11.1f} "
              f"{f.forward_equivalents:>9.2f}  {g['fake_score_forward']:.0f}/{g['fake_score_backward']:.0f}, "
              f"{g['generator_forward']:.0f}/{g['generator_backward']:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
