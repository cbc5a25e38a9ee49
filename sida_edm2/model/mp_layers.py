"""Magnitude-preserving primitives of EDM2 (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models"), written from the paper (docs/ARCHITECTURE.md, "The networks").

Every op keeps unit-variance inputs at unit variance, so the network needs no biases and no
normalisation layers. `MPConv.forward` is pure: forced weight normalisation (rescaling the *stored*
weights) lives in `sida_edm2.model.weight_norm`, outside the autograd graph.
"""

import math

import torch
import torch.nn.functional as F

# mp_silu's divisor: the standard deviation of silu(x) for x ~ N(0, 1), so the output has unit magnitude.
SILU_STD = 0.596
# normalize's default epsilon (also that of forced weight normalisation).
NORMALIZE_EPS = 1e-4


def normalize(
    x: torch.Tensor, dim: int | list[int] | None = None, eps: float = NORMALIZE_EPS
) -> torch.Tensor:
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


def mp_cat(
    a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5, fused: bool = False
) -> torch.Tensor:
    """Concatenate along `dim` so that a contributes with weight (1-t) and b with weight t, whatever
    their channel counts, and the result keeps unit magnitude. `fused` (dim 1 of 4-D activations only)
    writes both scaled halves straight into the result (sida_edm2.model.mp_fused)."""
    Na = a.shape[dim]
    Nb = b.shape[dim]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t**2))
    wa = C / math.sqrt(Na) * (1 - t)
    wb = C / math.sqrt(Nb) * t
    if fused and dim == 1 and a.ndim == 4:
        return fused_kernels().mp_cat(a, b, wa, wb)
    return torch.cat([wa * a, wb * b], dim=dim)


def fused_kernels():
    """sida_edm2.model.mp_fused, imported on first use: it needs triton (the GPU image has it)."""
    from sida_edm2.model import mp_fused

    return mp_fused


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


def effective_weight(
    weight: torch.Tensor,
    gain: float | torch.Tensor,
    dtype: torch.dtype,
    channels_last: bool = False,
    fused: bool = False,
) -> torch.Tensor:
    """What an MPConv multiplies with: normalize(weight) * gain / sqrt(fan_in), computed in float32, then
    cast to `dtype` (and, for a conv kernel, laid out channels-last on request). A 0-d tensor gain is
    divided in its own dtype, as in EDM2; the product with the float32 weight stays float32 because a
    0-d (or [1]-shaped) tensor does not promote it. `fused`: one Triton kernel (sida_edm2.model.mp_fused)."""
    if fused:
        return fused_kernels().effective_weight(weight, gain, dtype, channels_last)
    w = normalize(weight.to(torch.float32))
    w = w * (gain / math.sqrt(w[0].numel()))
    w = w.to(dtype)
    if channels_last and w.ndim == 4:
        w = w.contiguous(memory_format=torch.channels_last)
    return w


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D activation is laid out channels-last (and not also plain contiguous, as C=1 or
    1x1 maps are)."""
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _apply_weight(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if w.ndim == 2:
        return x @ w.t()
    return F.conv2d(x, w, padding=(w.shape[-1] // 2,))


def _apply_weight_backward(
    grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, need_x: bool, need_w: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of _apply_weight with respect to x and w: the kernels autograd itself runs for them."""
    if w.ndim == 2:  # x: [B, in] (checked by the caller), y = x @ w.t()
        return (grad @ w if need_x else None), (grad.t() @ x if need_w else None)
    pad = w.shape[-1] // 2
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, x, w, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [need_x, need_w, False]
    )
    return grad_x, grad_w


class _RecomputedWeightMPConv(torch.autograd.Function):
    """y = _apply_weight(x, effective_weight(weight, gain)) that keeps only x, the weight parameter and
    the gain for backward: the effective weight (a float32 and a compute-dtype copy of every weight,
    about 6 bytes per parameter in bf16) is recomputed in backward by the very same ops, so the
    gradients equal those of the plain graph bit for bit."""

    @staticmethod
    def forward(ctx, x, weight, gain, channels_last, fused):
        ctx.save_for_backward(x, weight, gain if isinstance(gain, torch.Tensor) else None)
        ctx.float_gain = None if isinstance(gain, torch.Tensor) else gain
        ctx.channels_last = channels_last
        ctx.fused = fused
        return _apply_weight(x, effective_weight(weight, gain, x.dtype, channels_last, fused))

    @staticmethod
    def backward(ctx, grad):
        x, weight, gain_tensor = ctx.saved_tensors
        need_x, need_weight, need_gain, _, _ = ctx.needs_input_grad
        need_w = need_weight or need_gain
        with torch.set_grad_enabled(need_w):
            weight_ = weight.detach().requires_grad_(need_weight)
            gain_ = ctx.float_gain if gain_tensor is None else gain_tensor.detach().requires_grad_(need_gain)
            w = effective_weight(weight_, gain_, x.dtype, ctx.channels_last, ctx.fused)
        grad_x, grad_w = _apply_weight_backward(grad, x, w.detach(), need_x, need_w)
        grad_weight = grad_gain = None
        if need_w:
            inputs = [t for t, need in ((weight_, need_weight), (gain_, need_gain)) if need]
            grads = list(torch.autograd.grad(w, inputs, grad_w))
            grad_weight = grads.pop(0) if need_weight else None
            grad_gain = grads.pop(0) if need_gain else None
        return grad_x, grad_weight, grad_gain, None, None


class MPConv(torch.nn.Module):
    """Bias-free linear layer (kernel []) or 2-D convolution (kernel [k, k]) with weight normalisation.

    The effective weight is normalize(weight) * gain / sqrt(fan_in), computed in float32 and then cast to
    the input dtype. The stored weight is never modified here (see sida_edm2.model.weight_norm). Four
    switches change how it is computed, never what (sida_edm2.model.speed sets them on a whole network):
    - `recompute_weight` (default on): the effective weight is recomputed in backward instead of being
      kept for it (see _RecomputedWeightMPConv). Off inside torch.compile, whose partitioner decides that.
    - `cache_weight`: while the weight gets no gradient (frozen, or grad disabled), the effective weight
      is computed once and reused until `invalidate_weight_cache` (or an in-place change of the weight or
      gain that bumps its version). Not under torch.compile, not for ZeRO-3 partitioned weights.
    - `weight_is_effective`: the stored weight already is the effective weight (the frozen teacher,
      baked once by sida_edm2.model.speed.bake_effective_weights_); the gain argument is then ignored.
    - `fused`: the effective weight comes from one Triton kernel (sida_edm2.model.mp_fused), not ~6
      eager ops.
    """

    recompute_weight: bool = True  # Class-wide default; instances override it.

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
        self.cache_weight = False
        self.weight_is_effective = False
        self.fused = False
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None

    def invalidate_weight_cache(self) -> None:
        """Drop the cached effective weight (call after the weight or its gain changed in place)."""
        self._weight_cache = None

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        channels_last = is_channels_last(x)
        if self.weight_is_effective:
            w = self.weight.to(x.dtype)
            return _apply_weight(x, w.contiguous(memory_format=torch.channels_last) if channels_last else w)
        grad = torch.is_grad_enabled()
        weight_grad = grad and (self.weight.requires_grad or _requires_grad(gain))
        compiling = torch.compiler.is_compiling()
        fused = self.fused and not compiling
        if self.cache_weight and not weight_grad and not compiling and not hasattr(self.weight, "ds_status"):
            return _apply_weight(x, self._cached_effective_weight(gain, x.dtype, channels_last))
        if (
            self.recompute_weight
            and (weight_grad or (grad and x.requires_grad))
            and not compiling
            and not _autocast_enabled(x.device.type)  # autocast would not reach the backward
            and (self.weight.ndim == 4 or x.ndim == 2)
        ):
            return _RecomputedWeightMPConv.apply(x, self.weight, gain, channels_last, fused)
        return _apply_weight(x, effective_weight(self.weight, gain, x.dtype, channels_last, fused))

    def _cached_effective_weight(self, gain, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
        # Versions catch in-place updates made through autograd-visible ops (plain optimizers,
        # normalize_rows_); DeepSpeed writes through .data, hence the explicit invalidation.
        gain_key = (id(gain), gain._version) if isinstance(gain, torch.Tensor) else float(gain)
        key = (dtype, channels_last, self.weight.device, self.weight._version, gain_key)
        if self._weight_cache is None or self._weight_cache[0] != key:
            with torch.no_grad():
                w = effective_weight(self.weight, gain, dtype, channels_last, self.fused)
                self._weight_cache = (key, w)
        return self._weight_cache[1]


def _requires_grad(gain: float | torch.Tensor) -> bool:
    return isinstance(gain, torch.Tensor) and gain.requires_grad


def _autocast_enabled(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
