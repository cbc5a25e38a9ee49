"""GPU benchmark of the latent-dataset stage (issue 3): SD-VAE encoding and the training reader.

    python benchmarks/encode_bench.py --out benchmarks/results/encode_bench.json
    python benchmarks/encode_bench.py --device cpu --resolution 64 --iters 2 --pipeline-images 16 \\
        --reader-samples 512        # a quick CPU smoke run

The VAE is the real stabilityai/sd-vae-ft-mse architecture (83,653,863 parameters, checked) built from
its config with random weights: nothing is downloaded, and speed does not depend on the weights.
Rows:
- encode: images/s of `latent.vae.encode_moments` (uint8 host pixels -> moments, copy included) at
  batch 1 fp32 without channels_last (how EDM2's dataset tool runs), and at --batch in fp32 / bf16 with
  and without channels_last (the tool's default: fp32, channels_last, batch 32).
- pipeline: encode_dataset's whole job (JPEG decode, crop, VAE, shard writing) on synthetic JPEGs.
- reader: samples/s of `latent.reader.LatentLoader` at 64x64 latents, per DataLoader worker count.
Prints a table; --out writes JSON (.json) or the table (any other suffix).
"""

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from latent.encode_job import EncodeOptions, run_encode
from latent.reader import LatentLoader
from latent.shards import write_synthetic_dataset
from latent.vae import SD_VAE_FT_MSE_CONFIG, build_vae, encode_moments

SD_VAE_PARAMETERS = 83_653_863


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_encode(vae, device, batch: int, resolution: int, iters: int, warmup: int = 3) -> float:
    pixels = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8)
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    for _ in range(warmup):
        encode_moments(vae, pixels)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        encode_moments(vae, pixels)
    _sync(device)
    return batch * iters / (time.perf_counter() - start)


def encode_rows(device, batch: int, resolution: int, iters: int) -> list[dict]:
    rows = []
    variants = [(1, "float32", False), (batch, "float32", False), (batch, "float32", True)]
    if device.type == "cuda":
        variants.append((batch, "bfloat16", True))
    for size, dtype, channels_last in variants:
        vae = build_vae(SD_VAE_FT_MSE_CONFIG, device, getattr(torch, dtype))
        vae = vae.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if size == 1:
            iters_here = max(iters, 3) * 4  # batch 1 is fast per call: more calls for a stable number
        else:
            iters_here = iters
        rate = time_encode(vae, device, size, resolution, iters_here)
        rows.append(
            {
                "what": "encode",
                "batch": size,
                "dtype": dtype,
                "channels_last": channels_last,
                "img_per_s": rate,
            }
        )
        del vae
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def pipeline_row(device, batch: int, resolution: int, images: int, workers: int, workdir: Path) -> dict:
    from PIL import Image

    source = workdir / "jpegs" / "n00000000"
    source.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)  # ImageNet's most common size
    for i in range(images):
        Image.fromarray(np.roll(base, i, axis=1)).save(source / f"img{i:06d}.JPEG", quality=90)
    torch.manual_seed(0)
    build_vae(SD_VAE_FT_MSE_CONFIG).save_pretrained(workdir / "vae")
    options = EncodeOptions(
        source=str(source.parent),
        dest=str(workdir / "latents"),
        vae=str(workdir / "vae"),
        resolution=resolution,
        batch_size=batch,
        workers=workers,
        shard_size=256,
        device=str(device),
        progress=False,
    )
    start = time.perf_counter()
    manifest = run_encode(options)
    seconds = time.perf_counter() - start
    return {
        "what": "pipeline",
        "batch": batch,
        "dtype": "float32",
        "workers": workers,
        "images": manifest["num_samples"],
        "img_per_s": manifest["num_samples"] / seconds,
        "note": "includes VAE load and JPEG decode/crop",
    }


def reader_rows(samples: int, workdir: Path, worker_counts: list[int], batch: int = 64) -> list[dict]:
    rng = np.random.default_rng(0)
    n = 1024
    mean = rng.normal(size=(n, 4, 64, 64)).astype(np.float32)
    std = np.abs(rng.normal(size=(n, 4, 64, 64))).astype(np.float32) * 0.1
    write_synthetic_dataset(workdir / "reader", mean, std, rng.integers(0, 1000, n), 1000, shard_size=128)
    rows = []
    for workers in worker_counts:
        loader = LatentLoader(
            str(workdir / "reader"), batch, num_workers=workers, epoch_samples=samples, shuffle_buffer=256
        )
        iterator = iter(loader)
        next(iterator)  # worker start-up and the shuffle buffer's first fill are not throughput
        start = time.perf_counter()
        count = sum(x.shape[0] for x, _ in iterator)
        rate = count / (time.perf_counter() - start)
        rows.append(
            {
                "what": "reader",
                "batch": batch,
                "workers": workers,
                "samples_per_s": rate,
                "samples_per_s_per_worker": rate / max(1, workers),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'what':9} {'batch':>5} {'dtype':9} {'ch_last':7} {'workers':>7} {'rate':>12}"]
    for r in rows:
        rate = f"{r['img_per_s']:.1f} img/s" if "img_per_s" in r else f"{r['samples_per_s']:.0f} smp/s"
        channels = {True: "yes", False: "no"}.get(r.get("channels_last"), "")
        lines.append(
            f"{r['what']:9} {r['batch']:5d} {r.get('dtype', ''):9} {channels:7} "
            f"{r.get('workers', '')!s:>7} {rate:>12}"
        )
    return "\n".join(lines)


@click.command()
@click.option("--device", default="auto", help="auto (cuda if available), cuda, cpu.")
@click.option("--batch", default=32, show_default=True, help="Batch of the batched encode rows.")
@click.option("--resolution", default=512, show_default=True, help="Image size of the encode rows.")
@click.option("--iters", default=20, show_default=True, help="Timed batches per encode row.")
@click.option(
    "--pipeline-images", default=512, show_default=True, help="JPEGs for the pipeline row (0: skip)."
)
@click.option("--workers", default=min(8, os.cpu_count() or 1), show_default=True, help="Pipeline decoders.")
@click.option("--reader-samples", default=16384, show_default=True, help="Samples per reader row (0: skip).")
@click.option(
    "--reader-workers", default="1,2,4", show_default=True, help="Worker counts of the reader rows."
)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write results (.json: JSON).")
def main(device, batch, resolution, iters, pipeline_images, workers, reader_samples, reader_workers, out):
    device = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as encode_dataset.py sets it
    with torch.device("meta"):
        from diffusers import AutoencoderKL

        parameters = sum(p.numel() for p in AutoencoderKL(**SD_VAE_FT_MSE_CONFIG).parameters())
    if parameters != SD_VAE_PARAMETERS:
        raise click.ClickException(
            f"architecture has {parameters} parameters, sd-vae-ft-mse has {SD_VAE_PARAMETERS}"
        )
    rows = encode_rows(device, batch, resolution, iters)
    with tempfile.TemporaryDirectory() as tmp:
        if pipeline_images:
            rows.append(pipeline_row(device, batch, resolution, pipeline_images, workers, Path(tmp)))
        if reader_samples:
            rows += reader_rows(reader_samples, Path(tmp), [int(w) for w in reader_workers.split(",")])
    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "resolution": resolution,
        "vae_parameters": parameters,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    table = format_table(rows)
    click.echo(f"{env}\n{table}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        if out.endswith(".json"):
            Path(out).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        else:
            Path(out).write_text(f"{env}\n{table}\n")


if __name__ == "__main__":
    main()
