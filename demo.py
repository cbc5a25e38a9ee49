"""The whole pipeline on a generated toy dataset, on a CPU, in a few minutes (`make demo`).

    python demo.py --out demo-out            # what `make demo` runs
    python demo.py --out /tmp/demo --quick   # shortened settings (the CI test, tests/test_demo.py)

Every stage is one of the project's command lines, run as a subprocess exactly as a user would run it
(each command is printed first):
  1. python -m preprocess.toy_images     10 classes of coloured shapes, ImageNet train layout (PNGs)
  2. python -m latent.tiny_vae           a tiny AutoencoderKL, fitted briefly, calibrated to EDM2 scaling
  3. python encode_dataset.py            images -> latent shards (the ImageNet command with --vae DIR)
  4. python train_edm2.py --method edm2  a small EDM2 teacher trained with EDM2's loss on those latents
  5. torchrun train_edm2.py --method sida   one-step SiDA distillation (2 processes when 2 cores exist)
  6. python decode_samples.py            one-step samples -> PNG grid (and the teacher's 63-step grid)
Beside the sample grids it writes data-grid.png (the training images, one class per column, as in the
sample grids) and vae-grid.png (the same images through the tiny VAE: what any sample can look like at
best). Then a summary: paths, counts, final losses, and a latent-space Fréchet distance to the data of
the teacher (EDM2 Heun sampler, 63 evaluations) and of the one-step student.
"""

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    per_class: int  # toy images per class (10 classes)
    vae_fit_steps: int  # Adam steps fitting the tiny VAE to the images (0: random weights)
    teacher_kimg: float  # EDM2 teacher training length, kimg
    teacher_lr: float  # its Adam learning rate
    student_kimg: float  # SiDA distillation length, generator kimg
    fake_only_kimg: float  # SiDA phases, scaled down from the paper's 100 / 200 kimg
    sid_only_kimg: float
    eval_samples: int  # samples of teacher and student for the latent Fréchet distance
    grid_seeds: str  # seeds of the PNG grids (--classes 0-9: one class per grid column)
    grid_rows: int  # images per class in data-grid.png / vae-grid.png (rows; one class per column)


FULL = DemoSettings(
    per_class=50,
    vae_fit_steps=400,
    teacher_kimg=10,
    teacher_lr=2e-2,
    student_kimg=1.6,
    fake_only_kimg=0.16,
    sid_only_kimg=0.48,
    eval_samples=100,
    grid_seeds="0-99",
    grid_rows=10,
)
QUICK = DemoSettings(
    per_class=6,
    vae_fit_steps=0,
    teacher_kimg=0.128,
    teacher_lr=2e-2,
    student_kimg=0.096,
    fake_only_kimg=0.032,
    sid_only_kimg=0.064,
    eval_samples=40,
    grid_seeds="0-19",
    grid_rows=2,
)
PRESET = "demo"
TICKS = 20  # progress lines per training run: one every few seconds on two cores


def num_processes() -> int:
    """Two training processes where the machine has two cores (or GPUs) for them, else one."""
    import torch

    if torch.cuda.is_available():
        return min(2, torch.cuda.device_count())
    return 2 if len(os.sched_getaffinity(0)) >= 2 else 1


def run(argv: list[str], timings: dict, name: str) -> None:
    """Print the command as a user would type it, run it, stop the demo if it fails."""
    shown = ["python" if a == sys.executable else a for a in argv]
    click.secho("$ " + shlex.join(shown), fg="cyan")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=REPO, env=env)
    timings[name] = time.perf_counter() - start
    if result.returncode != 0:
        raise click.ClickException(f"{name} failed (exit code {result.returncode}): {shlex.join(shown)}")


def flags(**options) -> list[str]:
    """--name value pairs from keyword arguments (underscores become dashes; True gives a bare flag)."""
    out = []
    for name, value in options.items():
        out.append("--" + name.replace("_", "-"))
        if value is not True:
            out.append(f"{value:g}" if isinstance(value, float) else str(value))
    return out


def pipeline(out: Path, s: DemoSettings, nproc: int, timings: dict) -> dict[str, Path]:
    py = sys.executable
    paths = {
        "images": out / "images",
        "vae": out / "tiny-vae",
        "latents": out / "latents",
        "teacher": out / "teacher",
        "student": out / "sida",
        "samples": out / "samples",
        "teacher_samples": out / "teacher-samples",
    }
    p = {k: str(v) for k, v in paths.items()}
    images = flags(dest=p["images"], per_class=s.per_class, resolution=128)
    run([py, "-m", "preprocess.toy_images", *images], timings, "images")
    vae_stage(paths, s, timings)
    write_data_grids(paths["images"], paths["vae"], out, rows=s.grid_rows)
    encode = flags(source=p["images"], dest=p["latents"], vae=p["vae"], resolution=128, batch_size=50,
                   shard_size=100, workers=1, no_progress=True)  # fmt: skip
    run([py, "encode_dataset.py", *encode], timings, "encode")
    # One process for the teacher (it is small), a whole step per micro-batch (--batch-gpu 32).
    teacher = flags(preset=PRESET, method="edm2", data=p["latents"], run_dir=p["teacher"], batch_gpu=32,
                    lr=s.teacher_lr, max_kimg=s.teacher_kimg, checkpoint_kimg=s.teacher_kimg,
                    tick_kimg=s.teacher_kimg / TICKS, num_workers=1, vae=p["vae"])  # fmt: skip
    run([py, "train_edm2.py", *teacher], timings, "teacher")
    student = flags(preset=PRESET, method="sida", teacher=str(paths["teacher"] / "export-latest.safetensors"),
                    data=p["latents"], run_dir=p["student"], max_kimg=s.student_kimg,
                    fake_only_kimg=s.fake_only_kimg, sid_only_kimg=s.sid_only_kimg,
                    checkpoint_kimg=s.student_kimg, tick_kimg=s.student_kimg / TICKS, num_workers=1,
                    vae=p["vae"])  # fmt: skip
    launcher = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    run([*(launcher if nproc > 1 else [py]), "train_edm2.py", *student], timings, "student")
    grid = flags(vae=p["vae"], seeds=s.grid_seeds, classes="0-9", format="png,grid", grid_images=100)
    run(
        [py, "decode_samples.py", *flags(generator=p["student"], outdir=p["samples"]), *grid],
        timings,
        "decode",
    )
    teacher_grid = flags(generator=p["teacher"], teacher_steps=32, outdir=p["teacher_samples"])
    run([py, "decode_samples.py", *teacher_grid, *grid], timings, "decode_teacher")
    return paths


def vae_stage(paths: dict[str, Path], s: DemoSettings, timings: dict) -> None:
    """Make the tiny VAE (latent.tiny_vae keeps one made from the same images and settings). When it
    makes a new one over an earlier run's outputs (another version's fit, other images), everything
    encoded or trained with the old VAE is removed, so that the rerun redoes it instead of mixing
    latents of one VAE with the decoder of another (encode_dataset.py would refuse the new VAE)."""
    from latent.tiny_vae import SETTINGS_FILE

    record = paths["vae"] / SETTINGS_FILE
    before = record.read_bytes() if record.is_file() else None
    fit = flags(fit_images=paths["images"], fit_steps=s.vae_fit_steps) if s.vae_fit_steps else []
    argv = [sys.executable, "-m", "latent.tiny_vae", *flags(dest=paths["vae"]), *fit, *flags(resolution=128)]
    run(argv, timings, "vae")
    if record.read_bytes() == before:
        return
    made_from_vae = [path for name, path in paths.items() if name not in ("images", "vae")]  # later stages
    stale = [path for path in made_from_vae if path.exists()]
    if stale:
        click.echo(f"a new VAE: removing what the old one made ({', '.join(str(p) for p in stale)})")
        for path in stale:
            shutil.rmtree(path)


def write_data_grids(images: Path, vae_dir: Path, out: Path, rows: int) -> None:
    """data-grid.png: the first `rows` training images of each class, one class per column (as the
    sample grids: seed i has class i % 10); vae-grid.png: the same images encoded and decoded by the
    tiny VAE, the best any sample can look."""
    import numpy as np
    import PIL.Image
    import torch

    from latent.vae import load_vae
    from preprocess.toy_images import CLASSES, synset_name
    from sida_edm2.sample.sample_files import tile_grid

    paths = [
        images / synset_name(c) / f"toy-{c}-{r:05d}.png" for r in range(rows) for c in range(len(CLASSES))
    ]
    data = np.stack([np.asarray(PIL.Image.open(p).convert("RGB")) for p in paths])
    vae = load_vae(str(vae_dir))
    with torch.no_grad():
        x = torch.from_numpy(data).permute(0, 3, 1, 2).float() / 255
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
    recon = (decoded.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for name, grid in (("data-grid.png", data), ("vae-grid.png", recon)):
        PIL.Image.fromarray(tile_grid(grid, columns=len(CLASSES))).save(out / name)
    click.echo(f"wrote {out / 'data-grid.png'} and {out / 'vae-grid.png'}")


def last_stats(run_dir: Path) -> dict:
    """The last tick record of a training run (kimg, losses, ...)."""
    lines = (run_dir / "stats.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def pooled_features(latents, pool: int = 4):
    """Latents [N,4,16,16] -> [N, 64] float64 numpy: 4x4 average pooling, so that a few hundred samples
    estimate the covariance well (the full 1024 dimensions would need many thousands)."""
    import torch

    return torch.nn.functional.avg_pool2d(latents.float(), pool).flatten(1).double().numpy()


def latent_fd(a, b) -> float:
    """Fréchet distance between the pooled features of two latent sets (sida_edm2.sample.metrics' formula)."""
    import numpy as np

    from sida_edm2.sample.metrics import frechet_distance

    fa, fb = pooled_features(a), pooled_features(b)
    return frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))


def read_data_latents(shard_dir: Path, seed: int = 0):
    """Every sample of the dataset once, drawn (mean + std * noise) and scaled as training reads them."""
    import torch

    from latent.reader import LatentLoader

    loader = LatentLoader(str(shard_dir), 100, num_workers=0, resampled=False, seed=seed)
    return torch.cat([latents for latents, _ in loader])


def summarise(paths: dict[str, Path], eval_samples: int, timings: dict) -> dict:
    """Counts, final losses and latent Fréchet distances of teacher and student; printed and returned."""
    import torch

    from latent.reader import read_manifest
    from sida_edm2.io.network_files import load_network
    from sida_edm2.sample.sampling import generate_latents, teacher_latents

    torch.manual_seed(0)
    click.echo(f"summary: sampling {eval_samples} latents from the teacher (63 evaluations) and the student")
    data = read_data_latents(paths["latents"])
    seeds = list(range(1_000_000, 1_000_000 + eval_samples))  # not the grid's seeds
    teacher = load_network(paths["teacher"] / "export-latest.safetensors")
    student = load_network(paths["student"] / "export-latest.safetensors")
    x_teacher, _ = teacher_latents(teacher, seeds, num_steps=32)
    x_student, _ = generate_latents(student, seeds)
    half = len(data) // 2
    manifest = read_manifest(paths["latents"])
    teacher_stats, student_stats = last_stats(paths["teacher"]), last_stats(paths["student"])
    summary = {
        "paths": {k: str(v) for k, v in paths.items()},
        "grids": {
            "student": str(paths["samples"] / "grid.png"),
            "teacher": str(paths["teacher_samples"] / "grid.png"),
            "data": str(paths["images"].parent / "data-grid.png"),
            "vae": str(paths["images"].parent / "vae-grid.png"),
        },
        "images": manifest["num_samples"],
        "classes": manifest["num_classes"],
        "teacher_kimg": teacher_stats.get("kimg"),
        "student_kimg": student_stats.get("kimg"),
        "teacher_losses": {k: v for k, v in teacher_stats.items() if k.startswith("loss/")},
        "student_losses": {k: v for k, v in student_stats.items() if k.startswith("loss/")},
        "latent_fd": {
            "data_half_vs_half": latent_fd(data[:half], data[half:]),
            "teacher_heun_63": latent_fd(x_teacher, data),
            "student_one_step": latent_fd(x_student, data),
        },
        "eval_samples": eval_samples,
        "seconds": timings,
    }
    print_summary(summary)
    return summary


def print_summary(s: dict) -> None:
    fd = s["latent_fd"]
    lines = [
        "",
        "=== demo summary ===",
        f"data      {s['images']} images, {s['classes']} classes -> {s['paths']['latents']}",
        f"teacher   {s['teacher_kimg']:.1f} kimg of EDM2 training  {_losses(s['teacher_losses'])}",
        f"student   {s['student_kimg']:.2f} kimg of SiDA            {_losses(s['student_losses'])}",
        f"grids     {s['grids']['student']} (one step), {s['grids']['teacher']} (teacher, 63 steps),",
        f"          {s['grids']['data']} (the data), {s['grids']['vae']} (the data through the VAE)",
        f"latent FD to the data (4x4-pooled latents, {s['eval_samples']} samples each; lower is better):",
        f"  teacher, Heun 63 evaluations  {fd['teacher_heun_63']:.4f}",
        f"  student, 1 evaluation         {fd['student_one_step']:.4f}",
        f"  data half vs data half        {fd['data_half_vs_half']:.4f}  (the floor at this sample size)",
        "seconds   " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()),
    ]
    click.echo("\n".join(lines))


def _losses(losses: dict) -> str:
    return "  ".join(f"{k.removeprefix('loss/')} {v:.4g}" for k, v in sorted(losses.items()))


@click.command()
@click.option(
    "--out",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder (removed files are remade; an existing run resumes).",
)
@click.option("--quick", is_flag=True, help="Shortened settings (seconds per stage; the CI test).")
@click.option(
    "--nproc",
    type=click.IntRange(1, 2),
    default=None,
    help="Training processes [default: 2 if the machine has 2 cores or GPUs, else 1].",
)
def main(out: str, quick: bool, nproc: int | None) -> None:
    """Run the toy pipeline end to end and print a summary."""
    settings = QUICK if quick else FULL
    nproc = nproc or num_processes()
    out_path = Path(out).resolve()
    out_path.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    paths = pipeline(out_path, settings, nproc, timings)
    summary = summarise(paths, settings.eval_samples, timings)
    summary["total_seconds"] = time.perf_counter() - start
    summary["processes"] = nproc
    (out_path / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    click.echo(f"wrote {out_path / 'summary.json'}; total {summary['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
