"""Fused Triton kernels for the magnitude-preserving elementwise chains of EDM2's UNet, each an autograd
Function with its own backward (issue 16). The eager functions of sida_edm2.model.mp_layers stay the
reference and the CPU path; these compute the same values in float32 registers and round once at the
end, so they agree with eager to the rounding of the compute dtype (bit for bit only in float32 up to
the order of the float32 operations).

    y = mp_silu(x)                        # silu(x) / 0.596                              1 kernel
    y = modulated_mp_silu(y, lin)         # mp_silu(y * (lin + 1)[:, :, None, None])       1 kernel
    x = mp_sum(a, b, t, clip)             # lerp(a, b, t) / sqrt((1-t)^2 + t^2), clipped   1 kernel
    x = pixel_norm(x)                     # normalize(x, dim=1)                            1 kernel
    w = effective_weight(weight, gain, dtype, channels_last)   # one kernel for the row norms and cast

Activations must be dense in the standard (NCHW) or channels-last layout; the kernels work on either,
and their outputs keep it. The module imports triton: import it only where triton is installed (the
GPU image has it); on CPU the kernels run under TRITON_INTERPRET=1 (the tests do that).
"""

import math

import torch
import triton
import triton.language as tl

from sida_edm2.model.mp_layers import NORMALIZE_EPS, SILU_STD, is_channels_last

_BLOCK = 1024  # elements per program of the flat elementwise kernels
# [pixels, channels] tile of the per-pixel / per-channel kernels, by layout: long along the contiguous
# dimension (pixels in NCHW, channels in channels-last) so that loads coalesce.
_TILES = {False: (128, 16), True: (16, 128)}
_BLOCK_ROW = 1024  # weight elements per tile of the weight-row kernels
_MIN_PROGRAMS = 1024  # programs the modulation's backward aims for (several per SM of an H100/H200)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is dense in the standard or the channels-last layout, else a standard copy."""
    if x.is_contiguous() or is_channels_last(x):
        return x
    return x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(stride of n, stride of c, stride of a pixel) of a dense 4-D activation in either layout."""
    _, C, H, W = x.shape
    if is_channels_last(x):
        return H * W * C, 1, C
    return C * H * W, H * W, 1


def _pixel_launch(x: torch.Tensor) -> tuple[tuple[int], tuple[int, ...], dict]:
    """(grid, (C, pixels, stride of n, of c, of a pixel), tile sizes) of a per-pixel kernel over a
    dense 4-D activation: one program per image and block of pixels."""
    N, C, H, W = x.shape
    block_p, block_c = _TILES[is_channels_last(x)]
    grid = (N * triton.cdiv(H * W, block_p),)
    return grid, (C, H * W, *_strides(x)), dict(BLOCK_P=block_p, BLOCK_C=block_c)


def _run(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """Launch kernel[grid](*args, **meta); on the meta device, where the memory planner
    (sida_edm2.plan.activations) measures what the Functions save for backward, launch nothing."""
    if not args[0].is_meta:
        kernel[grid](*args, **meta)


def _grid(n: int, block: int) -> tuple[int]:
    return (triton.cdiv(n, block),)


# --- mp_silu ---------------------------------------------------------------------------------------


@triton.jit
def _silu_fwd_kernel(x_ptr, y_ptr, n, inv_std, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.sigmoid(x) * inv_std
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_bwd_kernel(x_ptr, g_ptr, gx_ptr, n, inv_std, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(x)
    gx = g * s * (1 + x * (1 - s)) * inv_std
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)


class _MPSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = _dense(x)
        y = torch.empty_like(x)
        _run(_silu_fwd_kernel, _grid(x.numel(), _BLOCK), x, y, x.numel(), 1 / SILU_STD, BLOCK=_BLOCK)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        g = g.contiguous(memory_format=_format(x))
        gx = torch.empty_like(x)
        _run(_silu_bwd_kernel, _grid(x.numel(), _BLOCK), x, g, gx, x.numel(), 1 / SILU_STD, BLOCK=_BLOCK)
        return gx


def _format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """silu(x) / SILU_STD in one kernel (backward: one kernel)."""
    return _MPSiLU.apply(x)


# --- modulation + mp_silu --------------------------------------------------------------------------


@triton.jit
def _modsilu_fwd_kernel(
    y_ptr, lin_ptr, out_ptr, C, P, s_n, s_c, s_p, inv_std, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr
):
    # Program (n * ceil(P / BLOCK_P) + pixel block): a [BLOCK_P, C] slab, C in tiles of BLOCK_C.
    blocks_p = tl.cdiv(P, BLOCK_P)
    n = tl.program_id(0) // blocks_p
    p = (tl.program_id(0) % blocks_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        # The modulation is cast to the activation dtype first, as the eager chain does.
        m = (
            (tl.load(lin_ptr + n * C + c, mask=c < C, other=0.0) + 1)
            .to(out_ptr.dtype.element_ty)
            .to(tl.float32)
        )
        offs = n.to(tl.int64) * s_n + c[None, :] * s_c + p[:, None] * s_p
        mask = (p[:, None] < P) & (c[None, :] < C)
        z = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) * m[None, :]
        tl.store(out_ptr + offs, (z * tl.sigmoid(z) * inv_std).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modsilu_bwd_kernel(
    y_ptr, lin_ptr, g_ptr, gy_ptr, glin_ptr, C, P, NC, P_SPLIT, s_n, s_c, s_p, inv_std,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Program (n, channel tile; pixel range): its partial sum over pixels of the modulation's gradient
    # goes to row program_id(1) of glin (summed by the caller; no atomics, so deterministic).
    blocks_c = tl.cdiv(C, BLOCK_C)
    n = tl.program_id(0) // blocks_c
    c = (tl.program_id(0) % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (tl.load(lin_ptr + n * C + c, mask=c < C, other=0.0) + 1).to(gy_ptr.dtype.element_ty).to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    start = tl.program_id(1) * P_SPLIT
    for p0 in range(start, tl.minimum(start + P_SPLIT, P), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        offs = n.to(tl.int64) * s_n + c[None, :] * s_c + p[:, None] * s_p
        mask = (p[:, None] < P) & (c[None, :] < C)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = y * m[None, :]
        s = tl.sigmoid(z)
        gz = g * s * (1 + z * (1 - s)) * inv_std
        tl.store(gy_ptr + offs, (gz * m[None, :]).to(gy_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(gz * y, axis=0)
    tl.store(glin_ptr + tl.program_id(1).to(tl.int64) * NC + n * C + c, acc, mask=c < C)


class _ModulatedMPSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, lin):
        y, lin = _dense(y), lin.contiguous()
        out = torch.empty_like(y)
        grid, shape, tiles = _pixel_launch(y)
        _run(_modsilu_fwd_kernel, grid, y, lin, out, *shape, 1 / SILU_STD, **tiles)
        ctx.save_for_backward(y, lin)
        return out

    @staticmethod
    def backward(ctx, g):
        y, lin = ctx.saved_tensors
        N, C, H, W = y.shape
        g = g.contiguous(memory_format=_format(y))
        gy = torch.empty_like(y)
        s_n, s_c, s_p = _strides(y)
        block_p, block_c = _TILES[is_channels_last(y)]
        tiles = N * triton.cdiv(C, block_c)
        # Enough programs to fill the GPU: the pixels are split into ranges (whole pixel blocks).
        splits = max(1, min(triton.cdiv(H * W, block_p), triton.cdiv(_MIN_PROGRAMS, tiles)))
        p_split = triton.cdiv(triton.cdiv(H * W, splits), block_p) * block_p
        splits = triton.cdiv(H * W, p_split)
        glin = torch.empty(splits, N, C, device=y.device, dtype=torch.float32)
        _run(_modsilu_bwd_kernel, (tiles, splits),
            y, lin, g, gy, glin, C, H * W, N * C, p_split, s_n, s_c, s_p, 1 / SILU_STD,
            BLOCK_P=block_p, BLOCK_C=block_c,
        )  # fmt: skip
        return gy, (glin[0] if splits == 1 else glin.sum(0)).to(lin.dtype)


def modulated_mp_silu(y: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
    """mp_silu(y * (lin + 1)[:, :, None, None]) for y [N, C, H, W] and lin [N, C] in one kernel."""
    return _ModulatedMPSiLU.apply(y, lin)


# --- mp_sum (+ clip) -------------------------------------------------------------------------------


@triton.jit
def _mpsum_fwd_kernel(a_ptr, b_ptr, out_ptr, n, t, scale, clip, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = (a + t * (b - a)) * scale
    if CLIP:
        x = tl.minimum(tl.maximum(x, -clip), clip)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mpsum_bwd_kernel(
    g_ptr, out_ptr, ga_ptr, gb_ptr, n, wa, wb, clip, CLIP: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CLIP:  # clipped outputs sit exactly on the bound; below it the gradient passes
        out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(tl.abs(out) < clip, g, 0.0)
    tl.store(ga_ptr + offs, (g * wa).to(ga_ptr.dtype.element_ty), mask=mask)
    tl.store(gb_ptr + offs, (g * wb).to(gb_ptr.dtype.element_ty), mask=mask)


class _MPSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, t, clip):
        a = _dense(a)
        b = b.contiguous(memory_format=_format(a))
        out = torch.empty_like(a)
        scale = 1 / math.sqrt((1 - t) ** 2 + t**2)
        do_clip = clip is not None
        _run(
            _mpsum_fwd_kernel,
            _grid(a.numel(), _BLOCK),
            a,
            b,
            out,
            a.numel(),
            t,
            scale,
            float(clip or 0),
            CLIP=do_clip,
            BLOCK=_BLOCK,
        )
        ctx.weights = ((1 - t) * scale, t * scale)
        ctx.clip = clip
        # Only the clipped sum needs a tensor for backward: the output (kept alive by the next layer).
        ctx.save_for_backward(out if do_clip else None)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        # With the clip, g is read at out's positions: in out's layout.
        g = _dense(g) if out is None else g.contiguous(memory_format=_format(out))
        ga, gb = torch.empty_like(g), torch.empty_like(g)
        wa, wb = ctx.weights
        do_clip = ctx.clip is not None
        _run(_mpsum_bwd_kernel, _grid(g.numel(), _BLOCK),
            g, out if do_clip else g, ga, gb, g.numel(), wa, wb, float(ctx.clip or 0),
            CLIP=do_clip, BLOCK=_BLOCK,
        )  # fmt: skip
        return ga, gb, None, None


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5, clip: float | None = None) -> torch.Tensor:
    """mp_sum(a, b, t), then clipped to +-clip (None: not clipped), in one kernel."""
    return _MPSum.apply(a, b, t, clip)


# --- pixel norm ------------------------------------------------------------------------------------


@triton.jit
def _pixnorm_fwd_kernel(
    x_ptr, out_ptr, C, P, s_n, s_c, s_p, inv_sqrt_c, eps, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr
):
    blocks_p = tl.cdiv(P, BLOCK_P)
    n = tl.program_id(0) // blocks_p
    p = (tl.program_id(0) % blocks_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    base = n.to(tl.int64) * s_n + p[:, None] * s_p
    ss = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (p[:, None] < P) & (c[None, :] < C)
        x = tl.load(x_ptr + base + c[None, :] * s_c, mask=mask, other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    inv = 1 / (eps + tl.sqrt(ss) * inv_sqrt_c)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (p[:, None] < P) & (c[None, :] < C)
        x = tl.load(x_ptr + base + c[None, :] * s_c, mask=mask, other=0.0).to(tl.float32)
        tl.store(
            out_ptr + base + c[None, :] * s_c, (x * inv[:, None]).to(out_ptr.dtype.element_ty), mask=mask
        )


@triton.jit
def _pixnorm_bwd_kernel(
    x_ptr, g_ptr, gx_ptr, C, P, s_n, s_c, s_p, inv_sqrt_c, eps, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr
):
    # y = x / d, d = eps + r, r = ||x|| / sqrt(C):  dx = (g - x * (g . x) / (d r C)) / d.
    blocks_p = tl.cdiv(P, BLOCK_P)
    n = tl.program_id(0) // blocks_p
    p = (tl.program_id(0) % blocks_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    base = n.to(tl.int64) * s_n + p[:, None] * s_p
    ss = tl.zeros([BLOCK_P], dtype=tl.float32)
    dot = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (p[:, None] < P) & (c[None, :] < C)
        x = tl.load(x_ptr + base + c[None, :] * s_c, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + c[None, :] * s_c, mask=mask, other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
        dot += tl.sum(g * x, axis=1)
    r = tl.sqrt(ss) * inv_sqrt_c
    d = eps + r
    # r = 0 means x = 0 on that pixel: the correction term vanishes with it.
    k = tl.where(r > 0, dot / (d * tl.maximum(r, 1e-30)) * (inv_sqrt_c * inv_sqrt_c), 0.0)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (p[:, None] < P) & (c[None, :] < C)
        x = tl.load(x_ptr + base + c[None, :] * s_c, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + c[None, :] * s_c, mask=mask, other=0.0).to(tl.float32)
        gx = (g - x * k[:, None]) / d[:, None]
        tl.store(gx_ptr + base + c[None, :] * s_c, gx.to(gx_ptr.dtype.element_ty), mask=mask)


class _PixelNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = _dense(x)
        out = torch.empty_like(x)
        grid, shape, tiles = _pixel_launch(x)
        _run(_pixnorm_fwd_kernel, grid, x, out, *shape, 1 / math.sqrt(shape[0]), NORMALIZE_EPS, **tiles)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        g = g.contiguous(memory_format=_format(x))
        gx = torch.empty_like(x)
        grid, shape, tiles = _pixel_launch(x)
        _run(_pixnorm_bwd_kernel, grid, x, g, gx, *shape, 1 / math.sqrt(shape[0]), NORMALIZE_EPS, **tiles)
        return gx


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    """normalize(x, dim=1) of a 4-D activation in one kernel (backward: one kernel)."""
    return _PixelNorm.apply(x)


# --- effective weight ------------------------------------------------------------------------------


@triton.jit
def _gain_scale(gain_ptr, gain, inv_sqrt_fan_in, GAIN_TENSOR: tl.constexpr):
    # A tensor gain is divided by sqrt(fan_in) in its own dtype (as in EDM2); a float one in float32.
    if GAIN_TENSOR:
        g = tl.load(gain_ptr)
        return (g.to(tl.float32) * inv_sqrt_fan_in).to(g.dtype).to(tl.float32)
    return gain * inv_sqrt_fan_in


@triton.jit
def _out_offsets(j, L, KK, CL: tl.constexpr):
    # Element j = i * KK + tap of a row; channels-last conv kernels store it at tap * (L / KK) + i.
    if CL:
        return (j % KK) * (L // KK) + j // KK
    return j


@triton.jit
def _weight_fwd_kernel(
    v_ptr, gain_ptr, out_ptr, L, KK, gain, inv_sqrt_fan_in, eps,
    GAIN_TENSOR: tl.constexpr, CL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64) * L
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, L, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + row + j, mask=j < L, other=0.0).to(tl.float32)
        ss += v * v
    r = tl.sqrt(tl.sum(ss, axis=0)) * inv_sqrt_fan_in
    scale = _gain_scale(gain_ptr, gain, inv_sqrt_fan_in, GAIN_TENSOR) / (eps + r)
    for j0 in range(0, L, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + row + j, mask=j < L, other=0.0).to(tl.float32)
        tl.store(
            out_ptr + row + _out_offsets(j, L, KK, CL), (v * scale).to(out_ptr.dtype.element_ty), mask=j < L
        )


@triton.jit
def _weight_bwd_kernel(
    v_ptr, gain_ptr, g_ptr, gv_ptr, ggain_ptr, L, KK, gain, inv_sqrt_fan_in, eps,
    GAIN_TENSOR: tl.constexpr, CL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # w = s v / d, d = eps + r, r = ||v|| / sqrt(L):  dv = s / d * (g - v (g . v) / (d r L)); the gain
    # gets sum(g v) / d / sqrt(L) per row (rows summed by the caller).
    row = tl.program_id(0).to(tl.int64) * L
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, L, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + row + j, mask=j < L, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row + _out_offsets(j, L, KK, CL), mask=j < L, other=0.0).to(tl.float32)
        ss += v * v
        dot += g * v
    r = tl.sqrt(tl.sum(ss, axis=0)) * inv_sqrt_fan_in
    d = eps + r
    gv_dot = tl.sum(dot, axis=0)
    s = _gain_scale(gain_ptr, gain, inv_sqrt_fan_in, GAIN_TENSOR)
    k = tl.where(r > 0, gv_dot / (d * tl.maximum(r, 1e-30)) * (inv_sqrt_fan_in * inv_sqrt_fan_in), 0.0)
    for j0 in range(0, L, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + row + j, mask=j < L, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row + _out_offsets(j, L, KK, CL), mask=j < L, other=0.0).to(tl.float32)
        tl.store(gv_ptr + row + j, (s / d * (g - v * k)).to(gv_ptr.dtype.element_ty), mask=j < L)
    if GAIN_TENSOR:
        tl.store(ggain_ptr + tl.program_id(0), gv_dot / d * inv_sqrt_fan_in)


class _EffectiveWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, gain, dtype, channels_last):
        v = weight.contiguous()
        O, L = v.shape[0], v[0].numel()
        KK = v[0, 0].numel() if v.ndim == 4 else 1
        cl = channels_last and v.ndim == 4
        out = torch.empty(v.shape, device=v.device, dtype=dtype)
        if cl:  # the same storage order as out.contiguous(memory_format=torch.channels_last)
            out = out.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        gain_tensor = isinstance(gain, torch.Tensor)
        _run(_weight_fwd_kernel, (O,),
            v, gain if gain_tensor else v, out, L, KK, 0.0 if gain_tensor else float(gain),
            1 / math.sqrt(L), NORMALIZE_EPS, GAIN_TENSOR=gain_tensor, CL=cl, BLOCK=_BLOCK_ROW,
        )  # fmt: skip
        ctx.save_for_backward(v, gain if gain_tensor else None)
        ctx.float_gain = None if gain_tensor else float(gain)
        ctx.cl = cl
        return out

    @staticmethod
    def backward(ctx, g):
        v, gain = ctx.saved_tensors
        O, L = v.shape[0], v[0].numel()
        KK = v[0, 0].numel() if v.ndim == 4 else 1
        g = g.contiguous(memory_format=torch.channels_last) if ctx.cl else g.contiguous()
        gv = torch.empty_like(v)
        gain_tensor = gain is not None
        ggain_rows = torch.empty(O if gain_tensor else 1, device=v.device, dtype=torch.float32)
        _run(_weight_bwd_kernel, (O,),
            v, gain if gain_tensor else v, g, gv, ggain_rows, L, KK, ctx.float_gain or 0.0,
            1 / math.sqrt(L), NORMALIZE_EPS, GAIN_TENSOR=gain_tensor, CL=ctx.cl, BLOCK=_BLOCK_ROW,
        )  # fmt: skip
        ggain = ggain_rows.sum().to(gain.dtype).reshape(gain.shape) if gain_tensor else None
        return gv, ggain, None, None


def effective_weight(
    weight: torch.Tensor, gain: float | torch.Tensor, dtype: torch.dtype, channels_last: bool = False
) -> torch.Tensor:
    """mp_layers.effective_weight in one kernel: row norms, gain, cast (and channels-last order)."""
    return _EffectiveWeight.apply(weight, gain, dtype, channels_last)


# --- mp_cat ----------------------------------------------------------------------------------------


class _MPCat(torch.autograd.Function):
    """Both scaled halves written straight into the output (eager: two scaled copies, then the cat)."""

    @staticmethod
    def forward(ctx, a, b, wa, wb):
        Na = a.shape[1]
        out = torch.empty(
            [a.shape[0], Na + b.shape[1], *a.shape[2:]],
            device=a.device,
            dtype=a.dtype,
            memory_format=_format(a),
        )
        torch.mul(a, wa, out=out[:, :Na])
        torch.mul(b, wb, out=out[:, Na:])
        ctx.split = (Na, wa, wb)
        return out

    @staticmethod
    def backward(ctx, g):
        Na, wa, wb = ctx.split
        return g[:, :Na] * wa, g[:, Na:] * wb, None, None


def mp_cat(a: torch.Tensor, b: torch.Tensor, wa: float, wb: float) -> torch.Tensor:
    """torch.cat([wa * a, wb * b], dim=1) of two 4-D activations without the intermediate copies."""
    return _MPCat.apply(a, b, wa, wb)
