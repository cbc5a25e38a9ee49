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

The iteration replica below (`build_iteration_networks`, `fake_score_pass`, `generator_pass`) runs the
Trainer's own per-micro-batch objectives (sida_edm2.train.objectives) on plain modules - the same
networks, train/eval modes, frozen parameters and losses - without DeepSpeed, on any device.
`sida_edm2.plan.memory` runs the same replica to measure the activations autograd saves.
"""

import argparse
import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from sida_edm2.model import speed
from sida_edm2.model.networks import Precond
from sida_edm2.model.presets import PRESETS, SIDA_SETTINGS, get_preset
from sida_edm2.train.losses import generator_loss_weights
from sida_edm2.train.objectives import (
    fake_score_objective,
    freeze_fake_score,
    generator_objective,
    thaw_fake_score,
)

# NVIDIA H100 SXM dense (no sparsity) bf16 tensor-core peak, FLOP/s (the datasheet's 1979 TFLOPS is sparse).
H100_SXM_BF16_DENSE_PEAK = 989.4e12

COUNTED_METHODS = ("sid", "sida")  # sid2a computes exactly what sida does



def network_kwargs(network: str | dict) -> dict:
    """Precond keyword arguments of a preset name, or a copy of the given kwargs dict."""
    return get_preset(network)["network"] if isinstance(network, str) else dict(network)


def loss_settings(network: str | dict) -> dict:
    """The preset's loss settings (sigma_init, tmax, alpha, lambdas); SiDA's defaults for bare kwargs.
    They scale the losses, so they matter only for the values, not for the counts."""
    return get_preset(network) if isinstance(network, str) else dict(SIDA_SETTINGS)


# ----------------------------------------------------------------------------------------------------
# The iteration replica.


@dataclasses.dataclass
class IterationNetworks:
    generator: Precond  # G: the teacher's architecture without logvar head, trainable
    fake_score: Precond  # f_psi: with logvar head, trainable
    teacher: Precond  # frozen, always in eval mode, its weights baked (sida_edm2.model.speed)
    settings: dict  # the preset's loss settings (loss_settings)
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
            settings=loss_settings(network),
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
    """Forward of one fake-score micro-batch (Trainer.fake_score_update): G in eval mode, the fake score
    in train mode, with the real batch (random latents) for SiDA. Returns the loss whose backward updates
    the fake score."""
    G, F = nets.generator, nets.fake_score
    device = next(F.parameters()).device
    G.eval()
    F.train()
    x_real = None if method == "sid" else _latents(G, batch, device)
    z, eps = _latents(G, batch, device), _latents(G, batch, device)
    terms = fake_score_objective(
        G, F, z, eps, torch.randn(batch, device=device), _one_hot_labels(G, batch, device), x_real,
        sigma_init=nets.settings["sigma_init"], lambda_adv_psi=nets.settings["lambda_adv_psi"],
    )  # fmt: skip
    return terms.loss


def generator_pass(nets: IterationNetworks, batch: int, method: str = "sida") -> torch.Tensor:
    """Forward of one generator micro-batch (Trainer.generator_update) of the SiDA phase ("sid": SiD's),
    G in train mode, the fake score frozen. Returns the loss whose backward reaches G through the inputs
    of both frozen networks."""
    G, F, settings = nets.generator, nets.fake_score, nets.settings
    device = next(G.parameters()).device
    G.train()
    z, eps = _latents(G, batch, device), _latents(G, batch, device)
    phase = "sid" if method == "sid" else "sida"
    weights = generator_loss_weights(phase, settings["lambda_sid"], settings["lambda_adv_theta"])
    uniform, labels = torch.rand(batch, device=device), _one_hot_labels(G, batch, device)
    freeze_fake_score(F, nets.cache_fake_score_weights)
    try:
        terms = generator_objective(
            G, F, nets.teacher, z, eps, uniform, labels, sigma_init=settings["sigma_init"],
            tmax=settings["tmax"], alpha=settings["alpha"], weights=weights,
        )  # fmt: skip
    finally:
        # The graph recorded the frozen state while it was built. The cache stays filled after the pass
        # (sida_edm2.plan.activations measures it) until the next one.
        thaw_fake_score(F, keep_cache=True)
    return terms.loss


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
    if method not in COUNTED_METHODS:
        raise ValueError(f"method must be one of {COUNTED_METHODS}, got {method!r}")
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
    parser.add_argument("--method", default="sida", choices=COUNTED_METHODS)
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
