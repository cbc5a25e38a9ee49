"""The SD-VAE (diffusers AutoencoderKL) as EDM2 uses it: pixels in [0, 1], posterior mean and std.

    vae = load_vae("stabilityai/sd-vae-ft-mse", "cuda", torch.float32)     # or a local directory
    mean, std = encode_moments(vae, pixels_uint8)      # [B,3,H,W] uint8 -> 2 x float32 [B,4,H/8,W/8]
    images = decode_to_uint8(vae, latents_scaled)      # EDM2-space latents -> uint8 [B,3,H,W]

bfloat16 is for GPUs (on CPU it is ~200x slower than float32); whatever the VAE's dtype, the moments
are computed from its raw output in float32. Speed switches of `load_vae` / `build_vae`:
  channels_last  channels-last memory layout on CUDA (default False: NCHW, which measured faster for this
                 VAE on an H200 in bf16: encoder 177 vs 132 img/s, decoder 76 vs 68; benchmarks/RESULTS.md),
  compile        torch.compile the encoder and decoder for fixed shapes (pass `pad_to` so the last,
                 smaller batch does not recompile).
Attention always goes through torch's scaled_dot_product_attention (diffusers' AttnProcessor2_0).
"""

import hashlib
import os
from pathlib import Path, PurePosixPath

import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import AttnProcessor2_0

from latent.scaling import unscale_latents

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
# The architecture of stabilityai/sd-vae-ft-mse (83,653,863 parameters), for building it with random
# weights offline (benchmarks) - the same dict as its config.json, minus bookkeeping keys.
SD_VAE_FT_MSE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}


def _prepare(
    vae: AutoencoderKL,
    device: str | torch.device,
    dtype: torch.dtype,
    channels_last: bool = False,
    compile: bool = False,
) -> AutoencoderKL:
    device = torch.device(device)
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError(f"the VAE runs in float32 on CPU ({dtype} there is far slower and gains nothing)")
    # nn.Module.to, not diffusers' override: that one warns about fp32-only modules even when there are none.
    vae = torch.nn.Module.to(vae, device=device, dtype=dtype).eval().requires_grad_(False)
    vae.set_attn_processor(AttnProcessor2_0())  # SDPA (flash / memory-efficient kernels), never q @ k^T
    if device.type == "cuda" and channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    if compile:
        # Fixed shapes: a new input shape recompiles instead of tracing a dynamic graph (callers pad).
        vae.encoder.compile(dynamic=False)
        vae.decoder.compile(dynamic=False)
    return vae


def build_vae(
    config: dict,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    compile: bool = False,
) -> AutoencoderKL:
    """An AutoencoderKL with random weights from an architecture dict (no download)."""
    return _prepare(AutoencoderKL(**config), device, dtype, channels_last, compile)


def load_vae(
    name_or_path: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
) -> AutoencoderKL:
    """AutoencoderKL from a Hugging Face hub id or a local directory (save_pretrained layout). A VAE that
    cannot be found or read raises OSError with a one-line message naming it.
    channels_last / compile: the speed switches of the module docstring."""
    problem = vae_reference_problem(name_or_path)
    if problem:
        raise OSError(problem)
    try:
        # low_cpu_mem_usage=False: the same load, without a notice that `accelerate` is not installed.
        vae = AutoencoderKL.from_pretrained(name_or_path, revision=revision, low_cpu_mem_usage=False)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot load the VAE {name_or_path}: {' '.join(str(err).split())}") from err
    return _prepare(vae, device, dtype, channels_last, compile)


def vae_reference_problem(name_or_path: str) -> str | None:
    """Why `name_or_path` cannot name a VAE (checked without loading or downloading), or None."""
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            return f"the VAE {name_or_path} is not a diffusers AutoencoderKL folder (no config.json)"
        return None
    if len(PurePosixPath(name_or_path).parts) != 2 or name_or_path.startswith((".", "/", "~")):
        return f"the VAE {name_or_path} is neither a local folder nor a Hugging Face hub id (org/name)"
    return None


def vae_revision(name_or_path: str, revision: str | None = None) -> str:
    """What identifies the weights: the hub commit (from the local cache), or a hash of local weights."""
    path = Path(name_or_path)
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not weights:
            return "local:unknown"
        digest = hashlib.sha256()
        for weight_file in weights:  # every shard of the weights, in a fixed order
            with open(weight_file, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
        return f"local-sha256:{digest.hexdigest()}"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    if isinstance(cached, str | os.PathLike):
        return Path(cached).parent.name  # .../snapshots/<commit>/config.json
    return revision or "unknown"


def downsampling_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent along each side: 2 per down block after the first (8 for the SD-VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _vae_device_dtype(vae: AutoencoderKL) -> tuple[torch.device, torch.dtype]:
    parameter = next(vae.parameters())
    return parameter.device, parameter.dtype


def _memory_format(vae: AutoencoderKL) -> torch.memory_format:
    """Inputs follow the VAE's layout, so convs need no transposes."""
    weight = vae.encoder.conv_in.weight
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _pad_batch(x: torch.Tensor, pad_to: int | None) -> torch.Tensor:
    """Repeat the last sample up to `pad_to` (a compiled VAE then sees one shape; outputs are sliced)."""
    if pad_to is None or len(x) >= pad_to:
        return x
    return torch.cat([x, x[-1:].expand(pad_to - len(x), *x.shape[1:])])


@torch.no_grad()
def encode_moments(
    vae: AutoencoderKL, pixels_uint8: torch.Tensor, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pixels [B,3,H,W] -> posterior (mean, std), float32 [B,4,H/8,W/8] on the VAE's device.
    pad_to: run smaller batches padded to this size (GroupNorm is per sample: the padding changes nothing)."""
    if pixels_uint8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels_uint8.dtype}")
    device, dtype = _vae_device_dtype(vae)
    count = len(pixels_uint8)
    pixels = _pad_batch(pixels_uint8.to(device, non_blocking=True), pad_to)
    x = (pixels.to(torch.float32) / 255).to(dtype)  # [0, 1] per EDM2
    x = x.contiguous(memory_format=_memory_format(vae))
    # The raw moments, then mean/std in float32: a bf16 exp(logvar/2) would lose the small stds.
    moments = vae.encode(x).latent_dist.parameters[:count].to(torch.float32)
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean.contiguous(), std.contiguous()


@torch.no_grad()
def decode_to_uint8(
    vae: AutoencoderKL, latents_scaled: torch.Tensor, pad_to: int | None = None
) -> torch.Tensor:
    """EDM2-space latents [B,4,h,w] -> uint8 images [B,3,8h,8w] (clamp(0,1)*255, truncated as EDM2).
    pad_to: as for `encode_moments`."""
    device, dtype = _vae_device_dtype(vae)
    count = len(latents_scaled)
    raw = unscale_latents(_pad_batch(latents_scaled.to(device, torch.float32), pad_to)).to(dtype)
    raw = raw.contiguous(memory_format=_memory_format(vae))
    images = vae.decode(raw).sample[:count].to(torch.float32)
    return (images.clamp(0, 1) * 255).to(torch.uint8)
