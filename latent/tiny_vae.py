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

import hashlib
import json
import math
import time
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
SETTINGS_FILE = "tiny_vae.json"  # in the VAE's directory: what it was made from, written last
FIT_RESOLUTION = 64  # image size of the fit (module docstring of `fit`)
FIT_BATCH = 8  # images per fit step: 400 steps of 8 fit better than 200 of 16 in the same time
FIT_LR = 1e-2  # Adam's peak learning rate
FIT_WARMUP = 10  # steps of linear learning-rate warm-up
# The colour anchor (docstring of `fit`): its weight at the first step, decaying linearly to zero at this
# fraction of the steps. 0.3 and 0.5 measured best of (0.1, 1), (0.3, 0.5), (1, 0.25), (1, 0.5), (1, 1),
# (3, 0.5); in (weight, fraction).
FIT_ANCHOR_WEIGHT = 0.3
FIT_ANCHOR_SPAN = 0.5
PROGRESS_S = 5.0  # seconds between progress lines
# Threads of the fit and calibration: the convolutions are too small to share out; on a loaded 2-core machine
# one thread made 0.57 s per step where two made 3.7 s (the threads wait on each other).
FIT_THREADS = 1


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


def _shrink(pixels_uint8: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """Pixels area-averaged down to `resolution` (None or larger: unchanged), still uint8."""
    if resolution is None or resolution >= pixels_uint8.shape[-1]:
        return pixels_uint8
    small = torch.nn.functional.interpolate(pixels_uint8.float(), size=resolution, mode="area")
    return small.round().clamp(0, 255).to(torch.uint8)


def fit(
    vae: AutoencoderKL,
    pixels_uint8: torch.Tensor,
    steps: int,
    batch: int = FIT_BATCH,
    lr: float = FIT_LR,
    seed: int = 0,
    resolution: int | None = FIT_RESOLUTION,
    progress: bool = False,
) -> list[float]:
    """Adam steps of reconstruction (MSE in [0, 1] pixels) of the posterior mean; returns the MSEs.

    What makes a short fit reproduce colours: a colour anchor, an extra loss that pulls the first three
    latent channels towards the image's RGB averaged over each latent pixel's 8x8 patch, with a weight
    that decays to zero halfway through. Without it the fit learns shapes and brightness first and, in
    400 steps, only one hue axis (orange to blue): greens and magentas came back grey-blue (shape colour
    error 0.20 on a 0-1 scale, per image 0.055; with the anchor 0.092 and 0.018, the reconstruction MSE
    0.0062 instead of 0.015). The anchor hands the decoder a colour-carrying latent from the first step;
    once it is gone, the latent is free again (the calibration rescales every channel anyway). Also:
    the fit runs at `resolution` (the network is convolutional: what it learns at 64 pixels holds at
    128, at a quarter of the cost per image), the decoder's output bias starts at the images' mean
    colour, and the learning rate warms up for FIT_WARMUP steps, then decays on a cosine to zero. The
    posterior std is neither sampled nor fitted: calibrate_ replaces it by a fixed small one.
    progress: print a line every few seconds."""
    pixels = _shrink(pixels_uint8, resolution)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vae.decoder.conv_out.bias.copy_(pixels.float().mean(dim=(0, 2, 3)) / 255)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train().requires_grad_(True)
    losses = []
    start = last_print = time.perf_counter()
    for step in range(steps):
        warmup = min(1.0, (step + 1) / FIT_WARMUP)
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(len(pixels), (batch,), generator=gen)
        x = pixels[index].float() / 255  # EDM2's [0, 1] convention (latent/vae.py)
        latents = vae.encode(x).latent_dist.mean
        mse = ((vae.decode(latents).sample - x) ** 2).mean()
        anchor = FIT_ANCHOR_WEIGHT * max(0.0, 1 - step / (FIT_ANCHOR_SPAN * steps))
        loss = mse + anchor * (latents[:, :3] - colour_anchor(x)).square().mean() if anchor > 0 else mse
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(mse.detach()))
        now = time.perf_counter()
        if progress and (now - last_print >= PROGRESS_S or step + 1 == steps):
            print(
                f"vae fit: step {step + 1}/{steps}, mse {np.mean(losses[-10:]):.4f}, {now - start:.0f} s",
                flush=True,
            )
            last_print = now
    vae.eval().requires_grad_(False)
    return losses


def colour_anchor(x: torch.Tensor) -> torch.Tensor:
    """The fit's target for the first three latent channels: [0, 1] pixels averaged over each 8x8 patch
    (one latent pixel), centred and stretched to about the spread of a fresh encoder's latents."""
    return 4 * (torch.nn.functional.avg_pool2d(x, 8) - 0.5)


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


def _settings(pixels: torch.Tensor, fit_steps: int, seed: int) -> dict:
    """What determines the fitted weights: the images' bytes, the fit's settings, the seed."""
    return {
        "images_sha256": hashlib.sha256(pixels.numpy().tobytes()).hexdigest(),
        "images_shape": list(pixels.shape),
        "fit_steps": fit_steps,
        "fit": {
            "resolution": FIT_RESOLUTION,
            "batch": FIT_BATCH,
            "lr": FIT_LR,
            "warmup": FIT_WARMUP,
            "anchor": [FIT_ANCHOR_WEIGHT, FIT_ANCHOR_SPAN],
        },
        "seed": seed,
        "config": TINY_VAE_CONFIG,
        "torch": torch.__version__,
    }


def create_tiny_vae(
    dest: str | Path,
    *,
    images: str | None = None,
    fit_steps: int = 0,
    resolution: int = 128,
    max_images: int = 512,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Build (seeded), fit for `fit_steps` on `images` if given, calibrate, save_pretrained to `dest`.
    Without `images` the calibration uses uniform-noise pixels. Returns a summary dict.

    A VAE that `dest` already holds from the same images and settings is kept, not refitted
    (summary["kept"]): latents encoded with it stay valid, whatever the floating-point behaviour of a
    refit on another machine. SETTINGS_FILE, written last, marks a finished VAE."""
    if images is not None:
        pixels = read_images(images, resolution, max_images)
    else:
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.randint(0, 256, (64, 3, resolution, resolution), generator=gen, dtype=torch.uint8)
    dest = Path(dest)
    settings = _settings(pixels, fit_steps, seed)
    record = dest / SETTINGS_FILE
    if record.is_file() and json.loads(record.read_text()).get("settings") == settings:
        return {**json.loads(record.read_text())["summary"], "kept": True}
    record.unlink(missing_ok=True)  # a VAE being replaced is unfinished until the new record exists
    torch.manual_seed(seed)
    vae = build_vae(TINY_VAE_CONFIG)
    threads = torch.get_num_threads()
    torch.set_num_threads(FIT_THREADS)
    try:
        losses = fit(vae, pixels, fit_steps, seed=seed, progress=progress) if fit_steps else []
        stats = calibrate_(vae, pixels)
    finally:
        torch.set_num_threads(threads)
    vae.save_pretrained(dest)
    summary = {
        "dest": str(dest),
        "images": len(pixels),
        "fit_steps": fit_steps,
        "final_mse": float(np.mean(losses[-10:])) if losses else None,
        **stats,
    }
    record.write_text(json.dumps({"settings": settings, "summary": summary}, indent=1) + "\n")
    return {**summary, "kept": False}


@click.command()
@click.option("--dest", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--fit-images", default=None, help="Image source to fit and calibrate on (folder/zip/tar).")
@click.option(
    "--fit-steps",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help=f"Adam steps, batch {FIT_BATCH}, at {FIT_RESOLUTION} pixels.",
)
@click.option("--resolution", default=128, show_default=True, type=click.IntRange(8), help="Crop size.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights and the fit.")
def main(dest: str, fit_images: str | None, fit_steps: int, resolution: int, seed: int) -> None:
    """Write a tiny, calibrated AutoencoderKL to --dest (usable as --vae DIR)."""
    if fit_steps and not fit_images:
        raise click.UsageError("--fit-steps needs --fit-images")
    summary = create_tiny_vae(
        dest, images=fit_images, fit_steps=fit_steps, resolution=resolution, seed=seed, progress=True
    )
    mse = "" if summary["final_mse"] is None else f", reconstruction MSE {summary['final_mse']:.4f}"
    kept = " (kept: made before from the same images and settings)" if summary["kept"] else ""
    made = f"tiny AutoencoderKL, calibrated on {summary['images']} images, {fit_steps} fit steps"
    click.echo(f"{dest}: {made}{mse}{kept}")


if __name__ == "__main__":
    main()
