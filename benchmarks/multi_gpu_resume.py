"""Exact resume across a kill on several GPUs: the final exports of a run killed at a random moment and
rerun with the same command, against an uninterrupted run (issue 15).

    python benchmarks/multi_gpu_resume.py --gpus 8 --workdir /tmp/resume8 --out resume8.json
    DS_ACCELERATOR=cpu python benchmarks/multi_gpu_resume.py --preset tiny --gpus 2 --kimg 0.256 \
        --batch-gpu 8 --workdir /tmp/resume-cpu        # the same check on CPU processes (gloo)

Builds a random XS teacher and a synthetic 64x64x4 latent dataset (one shard per rank and worker), then
runs `train_edm2.py --method sida` three times under torchrun: A and B uninterrupted, C killed (SIGKILL
to the whole launcher group) at a random moment after its first checkpoint and rerun to the end. A
against B gives the GPU's own non-determinism (atomics in cuDNN's and cuBLAS's backward kernels); the
resume is exact when C against A is no larger. Prints and writes the largest absolute difference of the
export tensors for both pairs.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.train_step import random_teacher  # noqa: E402
from latent.shards import write_synthetic_dataset  # noqa: E402
from sida_edm2.model.presets import get_preset  # noqa: E402


def synthetic_data(dest: Path, preset: str, shards: int, per_shard: int = 64) -> Path:
    """Raw SD-VAE-like moments (EDM2's channel means and stds) of the preset's latent size and classes."""
    if (dest / "manifest.json").exists():
        return dest
    network = get_preset(preset)["network"]
    res, classes = network["img_resolution"], network["label_dim"]
    rng = np.random.default_rng(0)
    n = shards * per_shard
    channel_mean = np.array([5.81, 3.25, 0.12, -2.15], np.float32).reshape(1, 4, 1, 1)
    channel_std = np.array([4.17, 4.62, 3.71, 3.28], np.float32).reshape(1, 4, 1, 1)
    mean = channel_mean + channel_std * rng.standard_normal([n, 4, res, res], dtype=np.float32)
    std = np.full_like(mean, 0.1)
    labels = rng.integers(0, classes, n)
    write_synthetic_dataset(dest, mean, std, labels, num_classes=classes, shard_size=per_shard)
    return dest


def train_command(
    preset: str, gpus: int, run_dir: Path, teacher: Path, data: Path, kimg: float, batch_gpu: int
) -> list:
    batch = batch_gpu * gpus
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
        str(REPO / "train_edm2.py"), "--preset", preset, "--method", "sida", "--teacher", str(teacher),
        "--data", str(data), "--run-dir", str(run_dir), "--batch", str(batch), "--batch-gpu", str(batch_gpu),
        "--max-kimg", str(kimg), "--checkpoint-kimg", str(kimg / 4), "--tick-kimg", str(kimg / 8),
        "--fake-only-kimg", str(kimg / 8), "--sid-only-kimg", str(kimg / 4), "--num-workers", "2",
    ]  # fmt: skip


def run(command: list, log: Path, kill_after_checkpoint: Path | None = None, delay_s: float = 0.0) -> int:
    """Run to the end, or SIGKILL the launcher's process group `delay_s` after the file appears."""
    with open(log, "a") as out:
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        if kill_after_checkpoint is not None:
            while proc.poll() is None and not kill_after_checkpoint.exists():
                time.sleep(0.2)
            time.sleep(delay_s)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def export_difference(a: Path, b: Path) -> float:
    ta, tb = load_file(a / "export-latest.safetensors"), load_file(b / "export-latest.safetensors")
    assert ta.keys() == tb.keys(), "the exports hold different tensors"
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


@click.command()
@click.option(
    "--preset", default="edm2-img512-xs", show_default=True, help="Preset (tiny: CPU smoke)."
)
@click.option("--gpus", type=int, default=torch.cuda.device_count(), show_default=True, help="GPUs (ranks).")
@click.option("--workdir", type=click.Path(path_type=Path), required=True, help="Teacher, data, run dirs.")
@click.option("--kimg", type=float, default=8.0, show_default=True, help="Length of each run.")
@click.option("--batch-gpu", type=int, default=32, show_default=True, help="Images per GPU per step.")
@click.option("--seed", type=int, default=0, show_default=True, help="Picks the kill delay.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the result as JSON here.")
def main(
    preset: str, gpus: int, workdir: Path, kimg: float, batch_gpu: int, seed: int, out: Path | None
) -> None:
    """Kill one of three identical runs at a random moment, rerun it, compare the final exports."""
    workdir.mkdir(parents=True, exist_ok=True)
    teacher = random_teacher(preset, workdir)
    data = synthetic_data(workdir / "data", preset, shards=2 * gpus)
    runs = {name: workdir / f"run-{name}" for name in "ABC"}
    delay = random.Random(seed).uniform(0.0, 20.0)
    codes = {}
    for name, run_dir in runs.items():
        command = train_command(preset, gpus, run_dir, teacher, data, kimg, batch_gpu)
        log = workdir / f"run-{name}.log"
        if name == "C":
            first_checkpoint = run_dir / "checkpoints" / "latest"  # written once a checkpoint is complete
            codes["C-killed"] = run(command, log, kill_after_checkpoint=first_checkpoint, delay_s=delay)
        codes[name] = run(command, log)
    result = {
        "gpus": gpus,
        "kill_delay_s": round(delay, 2),
        "exit_codes": codes,
        "A_vs_B_max_abs": export_difference(runs["A"], runs["B"]),
        "A_vs_C_max_abs": export_difference(runs["A"], runs["C"]),
    }
    result["exact_resume"] = result["A_vs_C_max_abs"] <= result["A_vs_B_max_abs"]
    print(json.dumps(result, indent=1))
    if out is not None:
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
