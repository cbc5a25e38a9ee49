"""A tiny AutoencoderKL for demos and tests: built offline, optionally fitted briefly to a few images,
calibrated to EDM2's fixed latent normalisation, saved with save_pretrained (a local --vae directory).

    python -m latent.tiny_vae --dest demo-out/tiny-vae                                  # random weights
    python -m latent.tiny_vae --dest demo-out/tiny-vae --fit-images demo-out/images --fit-steps 150

Same block types as sd-vae-ft-mse (4 levels, latents at 1/8 of the pixels, 4 channels), ~0.2M parameters.
EDM2's latent scaling (latent/scaling.py) has constants measured on the SD-VAE; a tiny VAE's raw latents
have other statistics (a random one: means ~0.2 apart and posterior std ~1, i.e. mostly noise). The
calibration therefore changes the two 1x1 convolutions around the latent so that, on the given images,
  - each channel's posterior mean has the SD-VAE's raw mean and std (so the scaled latents have std 0.5),
  - the posterior std is a fixed small fraction of that spread (as with the SD-VAE, the mean carries the
    image), and the decoder sees exactly the latents it saw before (the inverse map is folded into
    post_quant_conv).
"""

from pathlib import Path

import click
import numpy as np
import torch
from diffusers import AutoencoderKL

from latent.scaling import RAW_MEAN, RAW_STD
from latent.vae import SD_VAE_FT_MSE_CONFIG, build_vae

TINY_VAE_CONFIG = {
    **SD_VAE_FT_MSE_CONFIG,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 128,
}
POSTERIOR_STD_RATIO = 0.05  # calibrated posterior std, as a fraction of the channel's spread of means


def read_images(source: str, resolution: int, limit: int | None = None) -> torch.Tensor:
    """uint8 [N,3,R,R] from an image source (folder / zip / tar, as encode_dataset.py reads it), ADM crop."""
    from preprocess.crop import center_crop_dhariwal
    from preprocess.image_decode import decode_image
    from preprocess.sources import open_source, spread_subset

    src = open_source(source)
    arrays = []
    for item in spread_subset(src.items, limit):
        image, _, _ = decode_image(src.read(item))
        arrays.append(center_crop_dhariwal(image, resolution))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def fit(
    vae: AutoencoderKL,
    pixels_uint8: torch.Tensor,
    steps: int,
    batch: int = 8,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
) -> list[float]:
    """A few Adam steps of reconstruction (MSE in [0, 1] pixels) + a small KL term; returns the MSEs."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train().requires_grad_(True)
    losses = []
    for _ in range(steps):
        index = torch.randint(len(pixels_uint8), (batch,), generator=gen)
        x = pixels_uint8[index].float() / 255  # EDM2's [0, 1] convention (latent/vae.py)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        mse = ((vae.decode(z).sample - x) ** 2).mean()
        loss = mse + kl_weight * posterior.kl().mean() / x[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(mse.detach()))
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def calibrate_(vae: AutoencoderKL, pixels_uint8: torch.Tensor, batch: int = 32) -> dict:
    """Rewrite quant_conv / post_quant_conv in place (module docstring); returns the measured statistics."""
    means = torch.cat(
        [
            vae.encode(pixels_uint8[i : i + batch].float() / 255).latent_dist.mean
            for i in range(0, len(pixels_uint8), batch)
        ]
    )
    mu = means.mean(dim=(0, 2, 3)).double()
    spread = means.std(dim=(0, 2, 3)).double().clamp(min=1e-8)
    target_mean, target_std = (
        torch.tensor(RAW_MEAN, dtype=torch.float64),
        torch.tensor(RAW_STD, dtype=torch.float64),
    )
    a = target_std / spread  # new mean = a * old mean + b, per channel
    b = target_mean - a * mu
    channels = len(RAW_MEAN)
    q, post = vae.quant_conv, vae.post_quant_conv
    w, bias = q.weight.double(), q.bias.double()  # [2C, 2C, 1, 1]: rows 0..C-1 mean, C..2C-1 logvar
    w[:channels] *= a.reshape(-1, 1, 1, 1)
    bias[:channels] = a * bias[:channels] + b
    w[channels:] = 0  # a constant posterior std per channel
    bias[channels:] = 2 * torch.log(POSTERIOR_STD_RATIO * target_std)
    q.weight.copy_(w)
    q.bias.copy_(bias)
    # post_quant_conv(z) = W z + c must see the old latent (z_new - b) / a: W' = W / a, c' = c - W' b.
    pw = post.weight.double() / a.reshape(1, -1, 1, 1)
    post.bias.copy_(post.bias.double() - (pw[:, :, 0, 0] @ b))
    post.weight.copy_(pw)
    return {"raw_mean_before": mu.tolist(), "raw_std_before": spread.tolist()}


def create_tiny_vae(
    dest: str | Path,
    *,
    images: str | None = None,
    fit_steps: int = 0,
    resolution: int = 128,
    max_images: int = 512,
    seed: int = 0,
) -> dict:
    """Build (seeded), fit for `fit_steps` on `images` if given, calibrate, save_pretrained to `dest`.
    Without `images` the calibration uses uniform-noise pixels. Returns a summary dict."""
    torch.manual_seed(seed)
    vae = build_vae(TINY_VAE_CONFIG)
    if images is not None:
        pixels = read_images(images, resolution, max_images)
    else:
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.randint(0, 256, (64, 3, resolution, resolution), generator=gen, dtype=torch.uint8)
    losses = fit(vae, pixels, fit_steps, seed=seed) if fit_steps else []
    stats = calibrate_(vae, pixels)
    vae.save_pretrained(dest)
    return {
        "dest": str(dest),
        "images": len(pixels),
        "fit_steps": fit_steps,
        "final_mse": float(np.mean(losses[-10:])) if losses else None,
        **stats,
    }


@click.command()
@click.option("--dest", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--fit-images", default=None, help="Image source to fit and calibrate on (folder/zip/tar).")
@click.option(
    "--fit-steps", default=0, show_default=True, type=click.IntRange(0), help="Adam steps, batch 8."
)
@click.option("--resolution", default=128, show_default=True, type=click.IntRange(8), help="Crop size.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights and the fit.")
def main(dest: str, fit_images: str | None, fit_steps: int, resolution: int, seed: int) -> None:
    """Write a tiny, calibrated AutoencoderKL to --dest (usable as --vae DIR)."""
    if fit_steps and not fit_images:
        raise click.UsageError("--fit-steps needs --fit-images")
    summary = create_tiny_vae(dest, images=fit_images, fit_steps=fit_steps, resolution=resolution, seed=seed)
    mse = "" if summary["final_mse"] is None else f", reconstruction MSE {summary['final_mse']:.4f}"
    click.echo(
        f"{dest}: tiny AutoencoderKL, calibrated on {summary['images']} images, {fit_steps} fit steps{mse}"
    )


if __name__ == "__main__":
    main()
