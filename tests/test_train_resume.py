"""Resuming and starting runs: a run killed with SIGKILL and rerun ends bit-identical to an uninterrupted
one (2 CPU processes, ZeRO-2, through train_edm2.py), and SiD²A starts G from a generator export.

    python -m pytest tests/test_train_resume.py
"""

import json
import signal
import subprocess
import time

import psutil
import pytest
import safetensors.torch
import torch
from helpers_train import (
    REPO,
    cli_args,
    launch_command,
    make_dataset,
    make_generator_export,
    make_teacher,
    run_distributed,
    run_scenario,
    subprocess_env,
)

from sida_edm2.io.network_files import load_network

FINAL = "ckpt-00000006"  # 6 iterations of 8 images, checkpoints after iterations 2, 4 and 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return make_teacher(root / "teacher.safetensors"), make_dataset(root / "data")


def training_args(assets, run_dir):
    teacher, data = assets
    return cli_args(
        teacher, run_dir, data, method="sida", zero_stage=2, batch=8, batch_gpu=2, max_kimg=0.048,
        checkpoint_kimg=0.016, tick_kimg=0.008, fake_only_kimg=0, sid_only_kimg=0.016,
    )  # fmt: skip


def kill_after_first_checkpoint(args: list[str], run_dir) -> str:
    """Start the run, SIGKILL all its processes as soon as a checkpoint is complete; returns its name."""
    proc = subprocess.Popen(
        launch_command("train_edm2.py", args, nproc=2), cwd=REPO, env=subprocess_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # torchrun puts its workers in sessions of their own: kill the whole process tree, workers first.
    launcher = psutil.Process(proc.pid)
    workers = launcher.children(recursive=True)
    for process in [*workers, launcher]:
        process.kill()
    psutil.wait_procs(workers, timeout=30)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    return latest.read_text().strip()


def engine_fp32_weights(checkpoint, tag: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_killed_and_rerun_equals_uninterrupted(assets, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_distributed("train_edm2.py", training_args(assets, straight), nproc=2)
    killed_at = kill_after_first_checkpoint(training_args(assets, resumed), resumed)
    assert killed_at != FINAL
    output = run_distributed("train_edm2.py", training_args(assets, resumed), nproc=2)
    assert f"resumed from {resumed / 'checkpoints' / killed_at}" in output

    for name in ("export-latest.safetensors", "export-0000000.safetensors"):
        assert_same_tensors(
            safetensors.torch.load_file(straight / name), safetensors.torch.load_file(resumed / name)
        )
    for tag in ("G", "F"):  # the optimizer's fp32 master weights, consolidated from the ZeRO partitions
        assert_same_tensors(
            engine_fp32_weights(straight / "checkpoints" / FINAL, tag),
            engine_fp32_weights(resumed / "checkpoints" / FINAL, tag),
        )
    last_losses = [
        {k: v for k, v in json.loads(lines.splitlines()[-1]).items() if k.startswith("loss/")}
        for lines in (
            straight.joinpath("stats.jsonl").read_text(),
            resumed.joinpath("stats.jsonl").read_text(),
        )
    ]
    assert last_losses[0] == last_losses[1] and len(last_losses[0]) == 4
    # Feedback and the export decode_samples.py loads.
    assert list((straight / "grids").glob("grid-*.png")) and list((straight / "tensorboard").glob("events.*"))
    assert "kimg 0.048" in (straight / "log.txt").read_text()
    exported = load_network(straight / "export-latest.safetensors")
    assert exported.logvar_linear is None and exported.label_dim == 10
    # The newest K=3 checkpoints are kept, no partial ones, and `latest` names the final one.
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == [
        "ckpt-00000002", "ckpt-00000004", FINAL, "latest",
    ]  # fmt: skip
    assert (resumed / "checkpoints" / "latest").read_text() == FINAL


@pytest.mark.slow
def test_sid2a_starts_from_the_generator_export(assets, tmp_path):
    teacher, data = assets
    generator = make_generator_export(tmp_path / "sid-generator.safetensors")
    out = tmp_path / "report.json"
    options = dict(
        iterations=2, teacher=teacher, data=data, run_dir=tmp_path / "run", method="sid2a",
        init_generator=generator, zero_stage=2, batch=8, batch_gpu=4, force_norm=False,
    )  # fmt: skip
    run_scenario("init", out, nproc=1, **options)
    report = json.loads(out.read_text())
    assert report["g_is_init_generator"] and report["ema_is_init_generator"] and report["f_is_teacher"]
    assert report["phases"] == ["fake_only", "sid"]
    # --no-force-norm: the master rows keep the RMS 3 the test networks were given.
    assert report["max_row_rms_error"] > 1.0
