"""GPU benchmark of decode_samples.py's inner loop: one-step generation + SD-VAE decode, in img/s.

The generator is the XS preset (EDM2-XS architecture, random weights: speed does not depend on them),
the VAE the real stabilityai/sd-vae-ft-mse architecture built from its config (random weights, no
download). Each precision row runs both networks in that precision, at decode_samples.py's default
batch; the separate columns time each stage alone. The last line times the PNG writer threads on the CPU
(a 50k-image run needs them to keep up with the GPU).

    python benchmarks/decode_bench.py                        # bf16 and fp32, batch 32
    python benchmarks/decode_bench.py --batch 64 --iters 20 --precisions bf16
"""

import argparse
import tempfile
import time

import numpy as np
import torch

from latent.vae import SD_VAE_FT_MSE_CONFIG, build_vae, decode_to_uint8
from sida_edm2.model.networks import PRECISION_DTYPES, Precond
from sida_edm2.model.presets import get_preset
from sida_edm2.sample.sample_files import PngWriter
from sida_edm2.sample.sampling import generate_latents


def _timed(fn, iters: int, device: torch.device) -> float:
    """Seconds per call of fn after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def bench_precision(preset: str, batch: int, iters: int, dtype: torch.dtype, device: torch.device) -> dict:
    kwargs = {**get_preset(preset)["network"], "logvar_channels": 0}
    G = Precond(**kwargs).to(device).eval().requires_grad_(False)
    G.compute_dtype = dtype
    vae = build_vae(SD_VAE_FT_MSE_CONFIG, device, dtype)
    seeds = list(range(batch))
    latents, _ = generate_latents(G, seeds)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        t_gen = _timed(lambda: generate_latents(G, seeds), iters, device)
        t_dec = _timed(lambda: decode_to_uint8(vae, latents), iters, device)
        t_all = _timed(lambda: decode_to_uint8(vae, generate_latents(G, seeds)[0]).cpu(), iters, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    return {"gen": batch / t_gen, "dec": batch / t_dec, "all": batch / t_all, "peak_gib": peak}


def bench_png_writer(batch: int, iters: int, threads: int) -> float:
    """img/s of PngWriter on 512x512 images with smooth content plus noise (PNG cost depends on content)."""
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 512, dtype=np.float32)
    gradient = base[None, :, None] * 0.5 + base[:, None, None] * 0.5
    image = (gradient + rng.normal(0, 8, (512, 512, 3))).clip(0, 255)
    images = np.repeat(image.astype(np.uint8)[None], batch, axis=0)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with PngWriter(tmp, num_threads=threads) as writer:
            for i in range(iters):
                writer.submit(images, list(range(i * batch, (i + 1) * batch)), None)
        return batch * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="edm2-img512-xs")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (decode_samples.py default)")
    parser.add_argument("--iters", type=int, default=10, help="timed batches per measurement")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--png-threads", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_bench needs a CUDA GPU")
    device = torch.device("cuda", 0)
    gpu = torch.cuda.get_device_name(device)
    print(f"{gpu}, torch {torch.__version__}, {args.preset}, batch {args.batch}")
    print("| precision | generate img/s | VAE decode img/s | generate + decode + to host img/s | peak GiB |")
    print("|---|---|---|---|---|")
    for name in args.precisions.split(","):
        r = bench_precision(args.preset, args.batch, args.iters, PRECISION_DTYPES[name], device)
        torch.cuda.empty_cache()  # the networks of this row are gone; start the next from a clean pool
        print(f"| {name} | {r['gen']:.0f} | {r['dec']:.1f} | {r['all']:.1f} | {r['peak_gib']:.1f} |")
    png = bench_png_writer(args.batch, max(2, args.iters // 2), args.png_threads)
    print(f"PNG writer, {args.png_threads} threads, 512x512: {png:.0f} img/s")


if __name__ == "__main__":
    main()
