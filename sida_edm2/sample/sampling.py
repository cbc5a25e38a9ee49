"""Latent generation: the one-step generator, its optional few-step variant, and EDM2's Heun sampler.

    x, labels = generate_latents(G, seeds=[0, 1, 2])                  # x = G(2.5*z, sigma=2.5, c)
    x, labels = generate_latents(G, seeds, class_labels=88)           # one class for every seed
    x, labels = generate_latents(G, seeds, sigmas=[1.0, 0.3])         # few-step (3 evaluations)
    x, labels = teacher_latents(teacher, seeds, num_steps=32)         # EDM2 Heun, 63 evaluations

Every seed owns a torch.Generator (seed mod 2^32) on the sampling device, drawing in a fixed order:
the latent noise z [C,H,W] first, then the class index (whenever the network is class-conditional,
even if the class is given, so later draws never depend on that choice), then one noise tensor per
extra few-step sigma. A seed's image therefore depends only on the seed, never on batch size or rank
count. The noise-then-class order is the one of EDM2's and SiD's generation scripts, so on the same
device type the same seed gives them the same noise. CPU and CUDA generators produce different streams.

Few-step variant (optional; every number in the paper is one step): after x = G(2.5 z, 2.5), for each
sigma_k of a decreasing list below 2.5, re-noise x + sigma_k * eps_k and denoise with G at sigma_k.
G was trained only at sigma 2.5, so lower sigmas rely on the denoiser it inherited from the teacher;
treat it as an experiment, not as part of the evaluated method.
"""

import contextlib
import itertools
from collections.abc import Sequence

import torch

from sida_edm2.model.networks import SIGMA_INIT

ClassSpec = int | Sequence[int] | torch.Tensor | None


def denoise(net: torch.nn.Module, x: torch.Tensor, sigma, onehot: torch.Tensor | None) -> torch.Tensor:
    """D(x; sigma, c) as float32 (a Precond, or any module called like one)."""
    return net(x, sigma, onehot).to(torch.float32)


@contextlib.contextmanager
def compute_dtype(net: torch.nn.Module, dtype: torch.dtype | None):
    """Temporarily run `net` in `dtype` (its writable `compute_dtype`); None leaves it as it is."""
    if dtype is None or not hasattr(net, "compute_dtype"):
        yield
        return
    previous = net.compute_dtype
    net.compute_dtype = dtype
    try:
        yield
    finally:
        net.compute_dtype = previous


def _net_device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def _resolve_classes(class_labels: ClassSpec, count: int, label_dim: int) -> torch.Tensor | None:
    """Given classes as an int64 [count] tensor on the CPU, or None when they are drawn per seed."""
    if class_labels is None:
        return None
    if label_dim == 0:
        raise ValueError("class labels were given but the network is unconditional (label_dim 0)")
    if isinstance(class_labels, int):
        given = torch.full([count], class_labels, dtype=torch.int64)
    else:
        given = torch.as_tensor(class_labels, dtype=torch.int64).flatten().cpu()
        if given.numel() != count:
            raise ValueError(f"{given.numel()} class labels for {count} seeds")
    if given.min() < 0 or given.max() >= label_dim:
        raise ValueError(f"class labels must lie in [0, {label_dim - 1}]")
    return given


def draw_seed_inputs(
    seeds: Sequence[int],
    shape: Sequence[int],
    label_dim: int,
    class_labels: ClassSpec = None,
    device: torch.device | str = "cpu",
    num_extra_noise: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """Per-seed draws (module docstring): noise float32 [N,*shape], labels int64 [N] (None when
    label_dim is 0) and `num_extra_noise` further noise tensors [N,*shape], all on `device`."""
    device = torch.device(device)
    given = _resolve_classes(class_labels, len(seeds), label_dim)
    noises, labels, extras = [], [], [[] for _ in range(num_extra_noise)]
    for seed in seeds:
        gen = torch.Generator(device).manual_seed(int(seed) % (1 << 32))
        noises.append(torch.randn(list(shape), generator=gen, device=device))
        if label_dim:
            labels.append(torch.randint(label_dim, size=[], generator=gen, device=device))
        for extra in extras:
            extra.append(torch.randn(list(shape), generator=gen, device=device))
    noise = torch.stack(noises)
    if label_dim == 0:
        label_tensor = None
    elif given is not None:
        label_tensor = given.to(device)
    else:
        label_tensor = torch.stack(labels).to(torch.int64)
    return noise, label_tensor, [torch.stack(e) for e in extras]


def one_hot(labels: torch.Tensor | None, label_dim: int) -> torch.Tensor | None:
    """int64 [N] -> float32 one-hot [N, label_dim]; None stays None."""
    if labels is None:
        return None
    return torch.nn.functional.one_hot(labels, label_dim).to(torch.float32)


def check_sigmas(sigmas: Sequence[float], sigma_init: float = SIGMA_INIT) -> None:
    """ValueError unless the few-step sigmas decrease from sigma_init and stay > 0."""
    previous = sigma_init
    for s in sigmas:
        if not 0 < s < previous:
            raise ValueError(
                f"few-step sigmas must decrease from {sigma_init} and stay > 0, got {list(sigmas)}"
            )
        previous = s


@torch.no_grad()
def generate_latents(
    G: torch.nn.Module,
    seeds: Sequence[int],
    class_labels: ClassSpec = None,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    sigma_init: float = SIGMA_INIT,
    sigmas: Sequence[float] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One-step generation x = G(sigma_init * z, sigma_init, c) for each seed, then the optional
    few-step refinements at `sigmas`. G is a Precond. class_labels: None = drawn per
    seed, an int for all seeds, or one per seed. num_classes defaults to G.label_dim; device to G's;
    dtype (e.g. torch.bfloat16) overrides G.compute_dtype for this call.
    Returns (latents float32 [N,C,H,W] in EDM2 space, labels int64 [N] or None)."""
    label_dim = G.label_dim if num_classes is None else num_classes
    if label_dim != G.label_dim:
        raise ValueError(f"num_classes {num_classes} != network label_dim {G.label_dim}")
    check_sigmas(sigmas, sigma_init)
    device = _net_device(G) if device is None else torch.device(device)
    shape = [G.img_channels, G.img_resolution, G.img_resolution]
    noise, labels, extra = draw_seed_inputs(seeds, shape, label_dim, class_labels, device, len(sigmas))
    onehot = one_hot(labels, label_dim)
    with compute_dtype(G, dtype):
        x = denoise(G, sigma_init * noise, sigma_init, onehot)
        for sigma, eps in zip(sigmas, extra, strict=True):
            x = denoise(G, x + sigma * eps, sigma, onehot)
    return x, labels


def karras_sigmas(
    num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """EDM's time steps: sigma_max..sigma_min spaced uniformly in sigma^(1/rho), then a final 0
    (float64 [num_steps + 1])."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    i = torch.arange(num_steps, dtype=torch.float64)
    ramp = i / max(num_steps - 1, 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    steps = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([steps, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sampler(
    net: torch.nn.Module,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> torch.Tensor:
    """EDM2's deterministic sampler (no churn): Euler steps of the probability-flow ODE
    dx/dsigma = (x - D(x; sigma))/sigma along `karras_sigmas`, each corrected by Heun's 2nd-order
    average except the last step (to sigma 0). 2*num_steps - 1 network evaluations (63 for 32 steps).
    noise: unit Gaussian [N,C,H,W]; class_labels: one-hot [N, label_dim] or None. The state is kept
    in float64, as EDM2 does. Returns float32 latents."""
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho).to(noise.device)
    x_next = noise.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(itertools.pairwise(t_steps)):
        x_cur = x_next
        d_cur = (x_cur - denoise(net, x_cur, t_cur, class_labels).to(torch.float64)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - denoise(net, x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(torch.float32)


@torch.no_grad()
def teacher_latents(
    net: torch.nn.Module,
    seeds: Sequence[int],
    class_labels: ClassSpec = None,
    num_steps: int = 32,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher (EDM2 denoiser) images for `seeds` with `heun_sampler`; same per-seed draws and return
    values as `generate_latents`."""
    device = _net_device(net) if device is None else torch.device(device)
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    noise, labels, _ = draw_seed_inputs(seeds, shape, net.label_dim, class_labels, device)
    with compute_dtype(net, dtype):
        x = heun_sampler(net, noise, one_hot(labels, net.label_dim), num_steps=num_steps)
    return x, labels
