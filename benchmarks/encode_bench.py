"""GPU benchmark of the latent-dataset stage (issues 3 and 14): each stage's img/s and GPU busy share.

    python benchmarks/encode_bench.py --out benchmarks/results/encode_bench.json
    python benchmarks/encode_bench.py --device cpu --resolution 64 --iters 2 --images 16 \\
        --reader-samples 512        # a quick CPU smoke run

The VAE is the real stabilityai/sd-vae-ft-mse architecture (83,653,863 parameters, checked) built from
its config with random weights: nothing is downloaded, and speed does not depend on the weights.
Rows (benchmarks/vae_stages.py measures them; GPU busy = share of the wall time with a kernel or copy
on the GPU, from torch.profiler):
- prepare: one process's JPEG decode + ADM crop (what each encode_dataset worker does per image).
- encode: `latent.vae.encode_moments` alone (pinned uint8 host pixels -> moments) at batch 1 fp32
  without channels_last (how EDM2's dataset tool runs), at --batch in fp32, and in the fast setting
  (--fast-dtype, --channels-last/--no-channels-last, --compile).
- pipeline: encode_dataset's whole job (JPEG decode, crop, VAE, shard writing) on --images JPEGs made
  from real photographs (scikit-image's, cropped and resized to ImageNet-like sizes, quality 90), in
  fp32 and in the fast setting: img/s of the whole run and of its steady state (from the first batch
  on), and the steady state's GPU busy share. Then the max and mean abs difference between the two
  runs' posterior means and stds.
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

import vae_stages as st

from latent.reader import LatentLoader
from latent.shards import write_synthetic_dataset
from latent.vae import SD_VAE_FT_MSE_CONFIG

SD_VAE_PARAMETERS = 83_653_863


def encode_rows(device, batch: int, resolution: int, iters: int, fast: dict) -> list[dict]:
    variants = [(1, "float32", {"channels_last": False}), (batch, "float32", {})]
    if device.type == "cuda":
        fast_dtype = fast.pop("dtype")
        variants.append((batch, fast_dtype, fast))
    rows = []
    for size, dtype, switches in variants:
        iters_here = max(iters, 3) * 4 if size == 1 else iters  # batch 1: more calls for a stable number
        rate = st.encoder_rate(device, getattr(torch, dtype), size, resolution, iters_here, **switches)
        rows.append({"what": "encode", "batch": size, "dtype": dtype, **switches, **rate})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def pipeline_rows(device, batch: int, resolution: int, images: int, workers, fast: dict, workdir: Path):
    jpegs = st.make_photo_jpegs(workdir / "jpegs", images)
    vae_dir = st.save_random_vae(workdir / "vae")
    settings = [("float32", {})]
    if device.type == "cuda":
        settings.append((fast.pop("dtype"), fast))
    rows = [{"what": "prepare", **st.prepare_rate(str(workdir / "jpegs"), resolution, min(images, 128))}]
    common = {"resolution": resolution, "batch_size": batch, "shard_size": 256, "workers": workers}
    for dtype, switches in settings:
        dest = workdir / f"latents-{dtype}-{len(rows)}"  # 1: fp32, 2: the fast setting
        rate = st.encode_end_to_end(
            str(workdir / "jpegs"), vae_dir, str(dest), device, dtype, **common, **switches
        )
        rows.append({"what": "pipeline", "batch": batch, "dtype": dtype, **switches, **jpegs, **rate})
    if len(rows) == 3:
        reference, fast_run = (workdir / f"latents-{r['dtype']}-{i + 1}" for i, r in enumerate(rows[1:]))
        diff = st.moment_differences(reference, fast_run)
        rows.append({"what": "latent diff", **diff})
    return rows


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
    lines = []
    for r in rows:
        busy = {k: v for k, v in r.items() if k.endswith("busy") and v is not None}
        rates = {k: v for k, v in r.items() if k.endswith(("img_s", "per_s", "per_process"))}
        rest = {k: v for k, v in r.items() if k not in busy and k not in rates and k != "what"}
        parts = [f"{k} {v:.1f}" for k, v in rates.items()] + [f"{k} {v:.0%}" for k, v in busy.items()]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rest.items()]
        lines.append(f"{r['what']:12} " + ", ".join(parts))
    return "\n".join(lines)


@click.command()
@click.option("--device", default="auto", help="auto (cuda if available), cuda, cpu.")
@click.option("--batch", default=32, show_default=True, help="Batch of the batched encode rows.")
@click.option("--resolution", default=512, show_default=True, help="Image size of the encode rows.")
@click.option("--iters", default=20, show_default=True, help="Timed batches per encode row.")
@click.option(
    "--fast-dtype",
    type=click.Choice(["bfloat16", "float32"]),
    default="bfloat16",
    show_default=True,
    help="dtype of the fast rows (GPU).",
)
@click.option(
    "--channels-last/--no-channels-last",
    default=None,
    help="Layout of the fast rows [default: the VAE's default, channels_last].",
)
@click.option("--compile", "compile_vae", is_flag=True, help="torch.compile the VAE in the fast rows.")
@click.option(
    "--images", default=1024, show_default=True, help="Photo JPEGs of the pipeline rows (0: skip them)."
)
@click.option("--workers", type=int, default=None, help="Pipeline decoders [default: encode_dataset's].")
@click.option("--reader-samples", default=16384, show_default=True, help="Samples per reader row (0: skip).")
@click.option(
    "--reader-workers", default="1,2,4", show_default=True, help="Worker counts of the reader rows."
)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write results (.json: JSON).")
def main(
    device,
    batch,
    resolution,
    iters,
    fast_dtype,
    channels_last,
    compile_vae,
    images,
    workers,
    reader_samples,
    reader_workers,
    out,
):
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
    fast = {"dtype": fast_dtype, "compile": compile_vae}
    if channels_last is not None:
        fast["channels_last"] = channels_last
    rows = encode_rows(device, batch, resolution, iters, dict(fast))
    with tempfile.TemporaryDirectory() as tmp:
        if images:
            rows += pipeline_rows(device, batch, resolution, images, workers, dict(fast), Path(tmp))
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
