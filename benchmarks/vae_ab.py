"""Today's VAE stages beside the new ones, on one GPU, in one call: a markdown table of img/s and GPU
busy shares per variant, plus how far the fast paths' latents are from today's fp32 path.

    python benchmarks/vae_ab.py --baseline .baseline --out $OUT        # about 4 minutes on one H200
    python benchmarks/vae_ab.py --baseline .baseline --out /tmp/ab --smoke   # CPU, tiny sizes: a check

--baseline is a checkout of the code to compare against (e.g. `git worktree add .baseline 5703311`).
Each variant runs in its own process under a timeout (a variant that times out keeps the stages it
finished); the processes run one after another on the same GPU and the same JPEG set:
  today        the baseline's code: encoder, decoder, encode_dataset's job in fp32 (its default) and
               bf16, generation + decode + PNG (VAE in bf16, as decode_samples.py --vae-precision bf16)
  new-cl       this checkout in bf16, channels_last (the default layout), PNGs on 8 threads and on 8
               processes; also nvJPEG (torchvision.io.decode_jpeg on the GPU) against PIL's pixels
  new-nchw     this checkout in bf16, NCHW
  new-compile  this checkout in bf16, torch.compile'd VAE, in the faster of the two layouts above
The JPEG set: real photographs (scikit-image's) cropped and resized to ImageNet-like sizes, quality 90.
The VAE: the sd-vae-ft-mse architecture with seeded random weights (the same for every variant), so
latent differences compare code paths, not weights. Writes <out>/vae_ab.md, results.json, logs.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import vae_stages as st

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PNG_PROCESSES = 8


def _variants(compile_layout: bool) -> dict[str, dict]:
    """name -> code ('baseline' or 'new'), VAE switches, stages [(stage, dtype, extra options)]."""
    new_gen = {"png_processes": PNG_PROCESSES}
    return {
        "today": {
            "code": "baseline",
            "switches": {},
            "stages": [
                ("prepare", "float32", {}),
                ("encoder", "float32", {}),
                ("encoder", "bfloat16", {}),
                ("decoder", "bfloat16", {}),
                ("e2e", "float32", {}),
                ("e2e", "bfloat16", {}),
                ("gen_png", "bfloat16", {}),
            ],
        },
        "new-cl": {
            "code": "new",
            "switches": {"channels_last": True},
            "stages": [
                ("encoder", "bfloat16", {}),
                ("decoder", "bfloat16", {}),
                ("e2e", "bfloat16", {}),
                ("gen_png", "bfloat16", new_gen),
                ("gen_png_threads", "bfloat16", {}),
                ("gpu_jpeg", "bfloat16", {}),
            ],
        },
        "new-nchw": {
            "code": "new",
            "switches": {"channels_last": False},
            "stages": [
                ("encoder", "bfloat16", {}),
                ("decoder", "bfloat16", {}),
                ("e2e", "bfloat16", {}),
                ("gen_png", "bfloat16", new_gen),
            ],
        },
        "new-compile": {
            "code": "new",
            "switches": {"channels_last": compile_layout, "compile": True},
            "stages": [  # compilation first: if the time runs out, the encoder/decoder rows show its effect
                ("encoder", "bfloat16", {}),
                ("decoder", "bfloat16", {}),
                ("gen_png", "bfloat16", {**new_gen, "pad_batches": True}),
                ("e2e", "bfloat16", {}),
            ],
        },
    }


def run_stage(stage: str, dtype_name: str, extra: dict, switches: dict, a: argparse.Namespace) -> dict:
    """One stage in this (child) process, with the code of --code first on sys.path."""
    device = torch.device("cpu" if a.smoke else "cuda")
    work = Path(a.scratch)
    dest = work / f"latents-{a.child}-{dtype_name}"
    dtype_name = "float32" if a.smoke else dtype_name  # the VAE runs in float32 on CPUs
    dtype = getattr(torch, dtype_name)
    size = {"config": st.code()["tiny_vae"].TINY_VAE_CONFIG} if a.smoke else {}
    if stage == "prepare":
        return st.prepare_rate(str(work / "jpegs"), a.resolution, min(a.images, 128))
    if stage == "encoder":
        return st.encoder_rate(device, dtype, a.batch, a.resolution, a.iters, **size, **switches)
    if stage == "decoder":
        return st.decoder_rate(device, dtype, a.batch, a.resolution, max(2, a.iters // 2), **size, **switches)
    if stage == "e2e":
        vae_dir = st.save_random_vae(work / "vae", size.get("config"))
        options = {"resolution": a.resolution, "batch_size": a.batch, "shard_size": 256, **switches}
        jpegs = str(work / "jpegs")
        try:
            return st.encode_end_to_end(jpegs, vae_dir, str(dest), device, dtype_name, **options)
        except Exception as exn:  # e.g. workers forked under the profiler: measure again without it
            print(f"[{a.child}] e2e under the profiler failed ({exn}); again without it", flush=True)
            shutil.rmtree(dest, ignore_errors=True)
            return st.encode_end_to_end(jpegs, vae_dir, str(dest), device, dtype_name, busy=False, **options)
    if stage in ("gen_png", "gen_png_threads"):
        return st.generate_decode_png(
            device,
            a.gen_images,
            a.batch,
            dtype,
            dtype,
            preset="demo" if a.smoke else "edm2-img512-xs",
            vae_switches=switches,
            **size,
            **extra,
        )
    if stage == "gpu_jpeg":
        return {} if a.smoke else st.gpu_jpeg_check(str(work / "jpegs"), 128, device)
    raise ValueError(f"unknown stage {stage}")


def child(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(a.code).resolve()))
    torch.backends.cudnn.benchmark = True  # as encode_dataset.py sets it
    variant = _variants(a.compile_layout == "channels_last")[a.child]
    results = []
    for stage, dtype_name, extra in variant["stages"]:
        start = time.perf_counter()
        try:
            metrics = run_stage(stage, dtype_name, extra, variant["switches"], a)
        except Exception as exn:  # one failing stage must not hide the others' numbers
            metrics = {"error": f"{type(exn).__name__}: {exn}"}
            print(f"[{a.child}] {stage} {dtype_name}: {metrics['error']}", file=sys.stderr, flush=True)
        seconds = time.perf_counter() - start
        results.append(
            {"variant": a.child, "stage": stage, "dtype": dtype_name, "seconds": seconds, **metrics}
        )
        print(f"[{a.child}] {stage} {dtype_name} {seconds:.1f} s: {metrics}", flush=True)
        Path(a.json).write_text(json.dumps(results, indent=1))  # after each stage: a timeout keeps them
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # this stage's networks are gone: the next starts from a clean pool


def _fmt(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _busy(value) -> str:
    return "" if value is None else f" ({value:.0%})"


def table(results: list[dict], diffs: dict, variants: dict) -> str:
    """One row per (variant, dtype): each stage's img/s (GPU busy share in brackets)."""
    rows: dict[tuple, dict] = {}
    for r in results:
        row = rows.setdefault((r["variant"], r["dtype"]), {})
        for key, value in r.items():
            if key not in ("variant", "stage", "dtype", "seconds"):
                row[f"{r['stage']}:{key}"] = value
    lines = [
        "| variant | dtype | switches | encoder img/s | decoder img/s | encode e2e img/s steady (whole run) "
        "| gen+decode+PNG img/s (threads) | latent mean diff max / mean | std diff max / mean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, dtype), row in rows.items():
        if not any(k.startswith(("encoder:", "decoder:", "e2e:", "gen_png")) for k in row):
            continue
        switches = variants[name]["switches"]
        described = ", ".join(f"{k}={v}" for k, v in switches.items()) or "defaults"
        encoder = _fmt(row.get("encoder:encoder_img_s")) + _busy(row.get("encoder:encoder_busy"))
        decoder = _fmt(row.get("decoder:decoder_img_s")) + _busy(row.get("decoder:decoder_busy"))
        e2e = f"{_fmt(row.get('e2e:e2e_steady_img_s'))} ({_fmt(row.get('e2e:e2e_img_s'))})" + _busy(
            row.get("e2e:e2e_busy")
        )
        gen = _fmt(row.get("gen_png:gen_png_img_s")) + _busy(row.get("gen_png:gen_png_busy"))
        if "gen_png_threads:gen_png_img_s" in row:
            gen += f" ({_fmt(row['gen_png_threads:gen_png_img_s'])})"
        d = diffs.get(f"{name}-{dtype}", {})
        mean = f"{_fmt(d.get('mean_max_abs'), 4)} / {_fmt(d.get('mean_mean_abs'), 5)}" if d else "-"
        std = f"{_fmt(d.get('std_max_abs'), 5)} / {_fmt(d.get('std_mean_abs'), 6)}" if d else "-"
        errors = [f"{k.split(':')[0]}: {v}" for k, v in row.items() if k.endswith(":error")]
        lines.append(
            f"| {name} | {dtype} | {described} | {encoder} | {decoder} | {e2e} | {gen} | {mean} | {std} |"
        )
        lines += [f"|  | errors | {e[:200]} | | | | | | |" for e in errors]
    return "\n".join(lines)


def _faster_layout(results: list[dict]) -> str:
    """channels_last or nchw: the layout with less encoder + decoder time per image (nchw if unknown)."""

    def cost(variant: str) -> float:
        rates = {r["stage"]: r for r in results if r["variant"] == variant}
        try:
            return 1 / rates["encoder"]["encoder_img_s"] + 1 / rates["decoder"]["decoder_img_s"]
        except (KeyError, TypeError, ZeroDivisionError):
            return float("inf")

    return "channels_last" if cost("new-cl") < cost("new-nchw") else "nchw"


def orchestrate(a: argparse.Namespace) -> None:
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vae-ab-", dir=a.work))  # JPEGs, latents: kept out of --out
    deadline = time.monotonic() + a.budget
    jpegs = st.make_photo_jpegs(work / "jpegs", a.images)
    print(f"JPEG set: {jpegs}", flush=True)
    results: list[dict] = []
    layout = "nchw"
    caps = {"today": a.budget * 0.3, "new-cl": a.budget * 0.25, "new-nchw": a.budget * 0.2}
    for name in a.variants.split(","):
        if name == "new-compile":
            layout = _faster_layout(results)
        code = a.baseline if _variants(False)[name]["code"] == "baseline" else str(REPO)
        json_path = work / f"{name}.json"
        remaining = deadline - time.monotonic()
        timeout = max(10.0, min(caps.get(name, remaining), remaining))
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--code", code]
        argv += ["--scratch", str(work), "--json", str(json_path), "--compile-layout", layout]
        argv += [
            f"--{k.replace('_', '-')}={getattr(a, k)}" for k in ("images", "gen_images", "batch", "iters")
        ]
        argv += ["--smoke"] * a.smoke
        # The inherited PYTHONPATH (installed packages) stays: the child puts --code first on sys.path.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        start = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            # Own process group: a timeout ends the variant with its DataLoader and PNG worker processes.
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "timeout"
        print(
            f"{name}: exit {rc} after {time.perf_counter() - start:.0f} s (limit {timeout:.0f} s)", flush=True
        )
        if json_path.is_file():
            results += json.loads(json_path.read_text())
    reference = work / "latents-today-float32"
    diffs = {
        path.name.removeprefix("latents-"): st.moment_differences(reference, path)
        for path in sorted(work.glob("latents-*"))
        if path != reference and (path / "manifest.json").is_file()
    }
    env = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "jpegs": jpegs,
        "compile_layout": layout,
        "gen_images": a.gen_images,
        "batch": a.batch,
        "resolution": a.resolution,
    }
    text = table(results, diffs, _variants(layout == "channels_last"))
    spread = diffs.get("today-bfloat16", {}).get("reference_mean_spread", float("nan"))
    note = (
        f"{env['device']}, torch {env['torch']}, {env['cpus']} CPUs; {jpegs['jpegs']} JPEGs averaging "
        f"{jpegs['mean_width']:.0f}x{jpegs['mean_height']:.0f} ({jpegs['mean_kib']:.0f} KiB); "
        f"batch {a.batch}; GPU busy share in brackets; latent diffs: against today's fp32 encode of the "
        f"same JPEGs (spread of its posterior means {spread:.3f})."
    )
    extras = [
        f"{r['variant']} {r['stage']}: "
        + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in r.items()
            if k not in ("variant", "stage", "dtype")
        )
        for r in results
        if r["stage"] in ("prepare", "gpu_jpeg")
    ]
    report = f"{note}\n\n{text}\n\n" + "\n".join(f"- {e}" for e in extras) + "\n"
    (out / "vae_ab.md").write_text(report)
    (out / "results.json").write_text(
        json.dumps({"environment": env, "results": results, "diffs": diffs}, indent=1)
    )
    print("\n" + report)
    if not a.keep_work:
        shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="checkout of the code to compare against (e.g. .baseline)")
    parser.add_argument("--out", help="folder for the table (vae_ab.md), results.json and the variants' logs")
    parser.add_argument("--budget", type=float, default=220.0, help="seconds for all variants together")
    parser.add_argument("--images", type=int, default=768, help="JPEGs of the end-to-end encode")
    parser.add_argument("--gen-images", type=int, default=256, help="images of generate+decode+PNG")
    parser.add_argument("--batch", type=int, default=32, help="images per VAE call")
    parser.add_argument("--iters", type=int, default=8, help="timed batches of the encoder/decoder rows")
    parser.add_argument("--resolution", type=int, default=512, help="image size")
    parser.add_argument("--variants", default=",".join(_variants(False)), help="which variants, in order")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny VAE, 128 pixels: a quick check")
    # The child process's arguments (set by the orchestrator).
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help="parent of the scratch folder [default: the system's]")
    parser.add_argument("--keep-work", action="store_true", help="keep the JPEGs and latents afterwards")
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--compile-layout", default="nchw", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.smoke:
        a.resolution = 128
    if a.child:
        child(a)
        return
    if not a.baseline or not a.out:
        parser.error("--baseline and --out are required")
    unknown = set(a.variants.split(",")) - set(_variants(False))
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(_variants(False))}")
    if not (Path(a.baseline) / "latent" / "vae.py").is_file():
        parser.error(f"--baseline {a.baseline}: no checkout of this project there (latent/vae.py missing)")
    orchestrate(a)


if __name__ == "__main__":
    main()
