"""Magnitude-preserving primitives of EDM2 (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models"), written from DESIGN.md section 3.

Every op keeps unit-variance inputs at unit variance, so the network needs no biases and no
normalisation layers. `MPConv.forward` is pure: forced weight normalisation (rescaling the *stored*
weights) lives in `sida_edm2.weight_norm`, outside the autograd graph.
"""

import math

import torch
import torch.nn.functional as F

# mp_silu's divisor: the standard deviation of silu(x) for x ~ N(0, 1), so the output has unit magnitude.
SILU_STD = 0.596


def normalize(x: torch.Tensor, dim: int | list[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """Divide x by `eps + ||x|| / sqrt(n)` over `dim` (default: all but dim 0, i.e. per output row of a
    weight), n being the number of elements reduced. The norm is taken in float32 for fp16/bf16 inputs."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    # numel(norm)/numel(x) = 1/n: turns the L2 norm into an RMS.
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU rescaled to preserve unit magnitude."""
    return F.silu(x) / SILU_STD


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Weighted sum (1-t)*a + t*b, rescaled so two independent unit-variance inputs give unit variance."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenate along `dim` so that a contributes with weight (1-t) and b with weight t, whatever
    their channel counts, and the result keeps unit magnitude."""
    Na = a.shape[dim]
    Nb = b.shape[dim]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t**2))
    wa = C / math.sqrt(Na) * (1 - t)
    wb = C / math.sqrt(Nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


def resample(
    x: torch.Tensor, f: list[float] | tuple[float, ...] = (1, 1), mode: str = "keep"
) -> torch.Tensor:
    """2x down- or upsampling with the separable filter f (normalised to sum 1), or identity.

    With f = [1, 1] (the only filter EDM2 uses) downsampling is a 2x2 average pool and upsampling is
    nearest-neighbour; those take the fast pooling/interpolation kernels. Other even-length filters run
    as depthwise (transposed) convolutions with padding (len(f)-1)//2.
    """
    if mode == "keep":
        return x
    if mode not in ("down", "up"):
        raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")
    if list(f) == [1, 1]:
        return F.avg_pool2d(x, 2) if mode == "down" else F.interpolate(x, scale_factor=2.0, mode="nearest")
    if len(f) % 2 != 0:
        raise ValueError(f"resample filter must have even length, got {list(f)}")
    f1 = torch.as_tensor(f, dtype=torch.float32)
    f1 = f1 / f1.sum()
    pad = (len(f) - 1) // 2
    c = x.shape[1]
    kernel = torch.outer(f1, f1)[None, None].to(device=x.device, dtype=x.dtype).tile([c, 1, 1, 1])
    if mode == "down":
        return F.conv2d(x, kernel, groups=c, stride=2, padding=(pad,))
    # Upsampling spreads each input over 4 outputs: scale by 4 to keep the magnitude.
    return F.conv_transpose2d(x, kernel * 4, groups=c, stride=2, padding=(pad,))


class MPFourier(torch.nn.Module):
    """Random Fourier features of a scalar per sample: cos(x*freqs + phases)*sqrt(2), unit magnitude."""

    def __init__(
        self,
        num_channels: int,  # Number of output features.
        bandwidth: float = 1.0,  # Standard deviation of the frequencies, in cycles.
    ):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        y = y.cos() * math.sqrt(2)
        return y.to(x.dtype)


class MPConv(torch.nn.Module):
    """Bias-free linear layer (kernel []) or 2-D convolution (kernel [k, k]) with weight normalisation.

    The effective weight is normalize(weight) * gain / sqrt(fan_in), computed in float32 and then cast to
    the input dtype. The stored weight is never modified here (see sida_edm2.weight_norm).
    """

    def __init__(
        self,
        in_channels: int,  # Input channels (fan-in per kernel tap).
        out_channels: int,  # Output channels = rows of the weight.
        kernel: list[int] | tuple[int, ...],  # [] for a linear layer, [k, k] for a k x k convolution.
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = normalize(self.weight.to(torch.float32))
        # A 0-d tensor gain (emb_gain, out_gain) is divided in its own dtype, as in EDM2; the product with
        # the float32 weight stays float32 because 0-d tensors do not promote.
        w = w * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))
