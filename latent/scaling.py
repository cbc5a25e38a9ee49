"""EDM2's per-channel latent normalisation for SD-VAE latents (docs/ARCHITECTURE.md, "Known traps").

A raw VAE latent x (a draw from the posterior, N(mean, std^2)) is mapped to the space the EDM2 networks
see by `x * scale + bias` per channel, where scale = FINAL_STD / RAW_STD and bias = -RAW_MEAN * scale;
the result has roughly zero mean and standard deviation 0.5 (= sigma_data). Decoding inverts it.
"""

import torch

RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)
FINAL_STD = 0.5


def _scale_and_bias(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Computed in float64 then cast, so the constants are the same whatever dtype the latents use.
    raw_mean = torch.tensor(RAW_MEAN, dtype=torch.float64)
    raw_std = torch.tensor(RAW_STD, dtype=torch.float64)
    scale = FINAL_STD / raw_std
    bias = -raw_mean * scale
    shape = (len(RAW_MEAN), 1, 1)
    return (scale.reshape(shape).to(like.device, like.dtype), bias.reshape(shape).to(like.device, like.dtype))


def scale_latents(x: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents [..., 4, h, w] -> EDM2 space (per channel x * scale + bias)."""
    scale, bias = _scale_and_bias(x)
    return x * scale + bias


def unscale_latents(x: torch.Tensor) -> torch.Tensor:
    """EDM2-space latents [..., 4, h, w] -> raw VAE latents (inverse of `scale_latents`)."""
    scale, bias = _scale_and_bias(x)
    return (x - bias) / scale


def scaling_constants() -> dict:
    """The constants as recorded in every manifest.json (so a dataset documents its own normalisation)."""
    return {"raw_mean": list(RAW_MEAN), "raw_std": list(RAW_STD), "final_std": FINAL_STD}
