"""Crash safety of a run directory: kills at chosen points (the process SIGKILLs itself there, see
KILL_POINTS in tests/helpers_train.py), reruns, and damaged or missing checkpoint files. Real DeepSpeed
engines (ZeRO-2, one CPU process, 2 accumulation rounds), the tiny preset.

    python -m pytest tests/test_train_crash_safety.py
"""

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers_train import REPO, cli_args, make_dataset, make_teacher, subprocess_env

from sida_edm2.train.run_checkpoints import ResumeError, find_latest

# 4 iterations of 8 images, checkpoints (and exports) after iterations 2 and 4.
FIRST, FINAL = "ckpt-00000002", "ckpt-00000004"
OPTIONS = dict(
    method="sida", zero_stage=2, batch=8, batch_gpu=4, max_kimg=0.032, checkpoint_kimg=0.016,
    tick_kimg=0.008, fake_only_kimg=0, sid_only_kimg=0.016,
)  # fmt: skip


def run_single(run_dir: Path, assets, kill: str | None = None) -> subprocess.CompletedProcess:
    """The whole run in one plain `python` process (no launcher, so a kill ends it at once)."""
    teacher, data = assets
    options = {**OPTIONS, "teacher": teacher, "data": data, "run_dir": run_dir}
    if kill is not None:
        options["kill"] = kill
    args = [sys.executable, "tests/helpers_train.py", "train", str(run_dir.parent / "unused.json")]
    for key, value in options.items():
        args += [key, str(value)]
    proc = subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    expected = -signal.SIGKILL if kill else 0
    assert proc.returncode == expected, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def exports(run_dir: Path) -> dict[str, object]:
    """Every export file: tensors for .safetensors, the JSON without its random export_id."""
    out = {}
    for path in sorted(run_dir.glob("export-*")):
        if path.suffix == ".safetensors":
            out[path.name] = safetensors.torch.load_file(path)
        else:
            out[path.name] = {k: v for k, v in json.loads(path.read_text()).items() if k != "export_id"}
    return out


def assert_same_exports(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        if name.endswith(".safetensors"):
            assert a[name].keys() == b[name].keys()
            assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
        else:
            assert a[name] == b[name], name


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    return make_teacher(root / "teacher.safetensors"), make_dataset(root / "data")


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_single(run_dir, assets)
    return run_dir


@pytest.mark.slow
def test_kills_during_and_before_exports_then_rerun_equal_uninterrupted(straight, assets, tmp_path):
    run_dir = tmp_path / "run"
    # Killed inside the first checkpoint's export: its temporary file stays behind.
    run_single(run_dir, assets, kill="in-export")
    assert (run_dir / "checkpoints" / "latest").read_text() == FIRST
    assert list(run_dir.glob(".export-*.tmp-*"))
    # Rerun, killed once the final checkpoint is complete and named by `latest`, before its exports.
    run_single(run_dir, assets, kill="before-final-exports")
    assert (run_dir / "checkpoints" / "latest").read_text() == FINAL
    assert not list(run_dir.glob(".export-*.tmp-*"))
    stale, final = (exports(d)["export-latest.safetensors"] for d in (run_dir, straight))
    assert any(not torch.equal(v, final[k]) for k, v in stale.items())
    # Rerun of the now finished run: nothing to train, the exports become the uninterrupted run's.
    output = run_single(run_dir, assets).stdout
    assert "nothing to do" in output
    assert_same_exports(exports(run_dir), exports(straight))
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []
    # A rerun of the uninterrupted run changes none of its exports either.
    before = exports(straight)
    run_single(straight, assets)
    assert_same_exports(exports(straight), before)


def copy_run(straight: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "copy"
    shutil.copytree(straight, run_dir)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("pointer", [None, b"\xff\xfe garbage", b"ckpt-00000099", b"ckpt-00000002"])
def test_missing_or_wrong_pointer_resumes_from_the_newest_complete_checkpoint(straight, tmp_path, pointer):
    run_dir = copy_run(straight, tmp_path)
    latest = run_dir / "checkpoints" / "latest"
    if pointer is None:
        latest.unlink()
    else:
        latest.write_bytes(pointer)
    assert find_latest(run_dir) == run_dir / "checkpoints" / FINAL


@pytest.mark.slow
def test_incomplete_checkpoints_are_skipped_but_never_started_over(straight, tmp_path):
    run_dir = copy_run(straight, tmp_path)
    checkpoints = run_dir / "checkpoints"
    (checkpoints / FINAL / "ema.pt").unlink()
    (checkpoints / "latest").unlink()
    assert find_latest(run_dir) == checkpoints / FIRST
    shutil.rmtree(checkpoints / FIRST / "G")
    skipped = r"none is complete .ckpt-00000004 lacks ema\.pt; ckpt-00000002 lacks G"
    with pytest.raises(ResumeError, match=skipped):
        find_latest(run_dir)
    assert sorted(p.name for p in checkpoints.iterdir()) == [FIRST, FINAL]  # nothing deleted


@pytest.mark.slow
def test_truncated_checkpoint_stops_the_rerun_naming_the_file(straight, assets, tmp_path):
    run_dir = copy_run(straight, tmp_path)
    damaged = sorted((run_dir / "checkpoints" / FINAL / "G").rglob("*.pt"))[0]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(ResumeError, match=re.escape(f"damaged checkpoint file {damaged}")):
        find_latest(run_dir)
    # The same through the command line: one line naming the file, no traceback, nothing deleted.
    teacher, data = assets
    flags = {k: v for k, v in OPTIONS.items() if k != "method"}
    args = [sys.executable, "train_edm2.py", *cli_args(teacher, run_dir, data, method="sida", **flags)]
    proc = subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"Error: damaged checkpoint file {damaged}" in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [FIRST, FINAL, "latest"]
