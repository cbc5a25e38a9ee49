"""Shared pieces of the sampling / metrics / decode tests: a tiny network with non-trivial random
weights and a tiny AutoencoderKL (random weights, real diffusers architecture)."""

import torch

from sida_edm2.model.networks import Precond
from sida_edm2.model.presets import get_preset

# A 2-level AutoencoderKL: latents [4, h, w] decode to [3, 2h, 2w] images in milliseconds.
TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 32,
}


def tiny_net(seed: int = 0, label_dim: int | None = None) -> Precond:
    """The `tiny` preset network, with every weight drawn at random and the zero-initialised gains set
    to 0.5 (a fresh EDM2 network would return exactly c_skip * x and hide batch effects)."""
    kwargs = get_preset("tiny")["network"]
    if label_dim is not None:
        kwargs["label_dim"] = label_dim
    torch.manual_seed(seed)
    net = Precond(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.5) if p.ndim == 0 else p.normal_()
    return net.eval().requires_grad_(False)


def tiny_vae(seed: int = 0):
    """AutoencoderKL of TINY_VAE_CONFIG with random weights, float32 on the CPU."""
    from latent.vae import build_vae

    torch.manual_seed(seed)
    return build_vae(TINY_VAE_CONFIG)
