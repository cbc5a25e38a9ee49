"""Crash safety and multi-rank encoding, with real processes: a run killed mid-way and rerun ends with
every image exactly once; two torchrun ranks write disjoint shards; a different world size resumes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds
from click.testing import CliRunner
from helpers_latent import imagenet_tree, save_tiny_vae

from encode_dataset import main
from latent.encode_job import DELAY_ENV
from latent.verify import verify_dataset
from preprocess.sources import open_source

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return imagenet_tree(root / "train", per_class=4), save_tiny_vae(root / "vae")


def _args(tree, vae, dest, shard_size):
    return [
        *("encode_dataset.py", "--source", str(tree), "--dest", str(dest), "--vae", str(vae)),
        *("--resolution", "32", "--batch-size", "2", "--workers", "0", "--no-progress"),
        *("--shard-size", str(shard_size)),
    ]


def _keys(dest):
    manifest = json.loads((dest / "manifest.json").read_text())
    urls = [{"url": str(dest / s["name"])} for s in manifest["shards"]]
    return manifest, [sample["__key__"] for sample in wds.tarfile_samples(urls)]


def _usable_keys(tree):
    return sorted(i.key for i in open_source(str(tree)).items if "_bad_" not in i.key)


def test_killed_run_resumes_with_every_image_once(inputs, tmp_path):
    tree, vae = inputs
    dest = tmp_path / "out"
    command = [sys.executable, *_args(tree, vae, dest, shard_size=2)]  # 22 files -> 11 shards
    slow = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, DELAY_ENV: "0.4"}, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while (
        len(list((dest / "parts").glob("*.json"))) < 3 and slow.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    slow.kill()
    slow.wait()
    completed = sorted((dest / "parts").glob("*.json"))
    assert 3 <= len(completed) < 11 and not (dest / "manifest.json").exists()
    kept = {p.name: (dest / p.name.removesuffix(".json")).stat().st_mtime_ns for p in completed}
    # The two other ways a kill can leave a shard: mid-write (.tmp) and renamed but not yet recorded.
    (dest / "shard-000010.tar.tmp").write_bytes(b"half a tar")
    (dest / "shard-000009.tar").write_bytes(b"a tar without its record")

    rerun = CliRunner().invoke(main, command[2:], catch_exceptions=False)  # same command, this process
    assert rerun.exit_code == 0, rerun.output
    starts = [
        line for line in (dest / "logs" / "encode-rank0.log").read_text().splitlines() if "to encode" in line
    ]
    assert len(starts) == 2 and f"{11 - len(completed)} of 11 shards to encode" in starts[-1]
    manifest, keys = _keys(dest)
    assert manifest["num_samples"] == 20 and sorted(keys) == _usable_keys(tree)  # all, none twice
    assert {p: (dest / p.removesuffix(".json")).stat().st_mtime_ns for p in kept} == kept  # not redone
    assert not list(dest.glob("*.tmp")) and verify_dataset(dest) == []


def test_two_ranks_then_one_rank_resume(inputs, tmp_path):
    tree, vae = inputs
    dest = tmp_path / "out"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run(
        [*launcher, *_args(tree, vae, dest, 3)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    manifest, keys = _keys(dest)
    assert manifest["num_samples"] == 20 and sorted(keys) == _usable_keys(tree)
    for rank, shards in enumerate(([0, 2, 4, 6], [1, 3, 5, 7])):  # 22 files / 3 -> 8 shards, round robin
        log = (dest / "logs" / f"encode-rank{rank}.log").read_text()
        assert f"rank {rank}/2: {len(shards)} of 8 shards to encode" in log

    # Lose one shard of rank 1, then finish with a single process: only that shard is redone.
    (dest / "parts" / "shard-000003.tar.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in dest.glob("shard-*.tar")}
    result = CliRunner().invoke(main, _args(tree, vae, dest, 3)[1:], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    after = {p.name: p.stat().st_mtime_ns for p in dest.glob("shard-*.tar")}
    assert [name for name in before if before[name] != after[name]] == ["shard-000003.tar"]
    manifest, keys = _keys(dest)
    assert sorted(keys) == _usable_keys(tree) and verify_dataset(dest) == []
