"""GPU benchmark of decode_samples.py's stages (issues 5 and 14): each stage's img/s and GPU busy share.

The generator is the XS preset (EDM2-XS architecture, random weights: speed does not depend on them),
the VAE the real stabilityai/sd-vae-ft-mse architecture built from its config (random weights, no
download). Per precision (both networks in it), at decode_samples.py's default batch:
  generate   one-step generation alone (latents stay on the GPU)
  decode     VAE decoding alone (EDM2-space latents -> uint8 images on the GPU)
  gen+PNG    decode_samples.py's whole loop (sida_edm2's write_images): generate, decode, copy to the
             host, PNG files, with the PNG encoders on threads and on --png-workers processes
GPU busy (in brackets) is the share of the wall time with a kernel or copy on the GPU (torch.profiler;
benchmarks/vae_stages.py). The last lines time the PNG writer alone on the CPU, threads vs processes.

    python benchmarks/decode_bench.py                        # bf16 and fp32, batch 32
    python benchmarks/decode_bench.py --batch 64 --iters 20 --precisions bf16 --no-channels-last
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import vae_stages as st

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _busy(value) -> str:
    return "" if value is None else f" ({value:.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="edm2-img512-xs", help="generator preset")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (decode_samples.py default)")
    parser.add_argument("--iters", type=int, default=10, help="timed batches of the generate/decode rows")
    parser.add_argument("--images", type=int, default=512, help="images of the gen+PNG rows")
    parser.add_argument("--precisions", default="bf16,fp32", help="comma list of fp32, bf16, fp16")
    parser.add_argument("--png-workers", type=int, default=8, help="PNG processes of the gen+PNG rows")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--channels-last", dest="channels_last", action="store_true", default=None)
    layout.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="VAE in NCHW")
    parser.add_argument("--compile", action="store_true", help="torch.compile the VAE (fixed batch shape)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_bench needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda", 0)
    switches = {"compile": args.compile}
    if args.channels_last is not None:
        switches["channels_last"] = args.channels_last
    print(
        f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.preset}, batch {args.batch}"
    )
    print(f"VAE switches {switches}; GPU busy share in brackets")
    print(
        "| precision | generate img/s | VAE decode img/s | gen+decode+PNG img/s, threads | same, processes |"
    )
    print("|---|---|---|---|---|")
    for name in args.precisions.split(","):
        dtype = PRECISIONS[name]
        gen = st.generate_rate(device, args.batch, args.iters, dtype, args.preset)
        dec = st.decoder_rate(device, dtype, args.batch, 512, args.iters, **switches)
        torch.cuda.empty_cache()
        common = {"preset": args.preset, "vae_switches": switches, "pad_batches": args.compile}
        threads = st.generate_decode_png(device, args.images, args.batch, dtype, dtype, **common)
        procs = st.generate_decode_png(
            device, args.images, args.batch, dtype, dtype, png_processes=args.png_workers, **common
        )
        torch.cuda.empty_cache()  # the networks of this row are gone; start the next from a clean pool
        print(
            f"| {name} | {gen['generate_img_s']:.0f}{_busy(gen['generate_busy'])} "
            f"| {dec['decoder_img_s']:.1f}{_busy(dec['decoder_busy'])} "
            f"| {threads['gen_png_img_s']:.1f}{_busy(threads['gen_png_busy'])} "
            f"| {procs['gen_png_img_s']:.1f}{_busy(procs['gen_png_busy'])} |"
        )
    for writer in ({"num_threads": 8}, {"processes": args.png_workers}):
        st.png_rate(args.batch, args.batch, **writer)  # start-up (processes) is not throughput
        rate = st.png_rate(max(256, 4 * args.batch), args.batch, **writer)["png_img_s"]
        print(f"PNG writer alone, {writer}, 512x512: {rate:.0f} img/s")


if __name__ == "__main__":
    main()
