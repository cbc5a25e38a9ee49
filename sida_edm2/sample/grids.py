"""Sample grids of a network during training: 16 fixed seeds, decoded with a VAE or shown as latents.

    save_sample_grid(ema, run_dir / "grids" / "grid-0000500.png", sigma_init=2.5, vae=vae)
"""

import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from sida_edm2.sample.sample_files import tile_grid
from sida_edm2.sample.sampling import generate_latents, teacher_latents


def latents_to_uint8(latents: torch.Tensor) -> np.ndarray:
    """Latents [N,C,h,w] shown without a VAE: the first three channels, each mapped from +-2.5 std
    (EDM2 latents have std 0.5) to 0..255, as uint8 [N,h,w,3] (nearest-upscaled to >= 64 pixels)."""
    x = latents[:, :3].float()
    if x.shape[1] < 3:
        x = x[:, :1].expand(-1, 3, -1, -1)
    scale = max(1, 64 // x.shape[-1])
    x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    x = ((x / 1.25 + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()



@torch.no_grad()
def save_sample_grid(
    net: torch.nn.Module,
    path: str | os.PathLike,
    sigma_init: float,
    vae=None,
    heun_steps: int = 0,
    seeds: range = range(16),
) -> Path:
    """A PNG grid of images for fixed seeds (classes drawn per seed, see sida_edm2.sample.sampling): one step
    of the generator `net`, or, with heun_steps > 0, EDM2's Heun sampler on the denoiser `net`. Decoded
    with `vae` when given, else the latent channels are shown."""
    if heun_steps:
        latents, _ = teacher_latents(net, list(seeds), num_steps=heun_steps)
    else:
        latents, _ = generate_latents(net, list(seeds), sigma_init=sigma_init)
    if vae is not None:
        from latent.vae import decode_to_uint8

        images = decode_to_uint8(vae, latents).permute(0, 2, 3, 1).cpu().numpy()
    else:
        images = latents_to_uint8(latents)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(tile_grid(images), "RGB").save(path)
    return path
