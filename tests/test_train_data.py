"""What the loop draws: labels after the dataset's class frequencies, whole-step noise sliced per
micro-batch, and the real-data stream as a function of (seed, rank, segment) over real shards.

    python -m pytest tests/test_train_data.py
"""

import json
import subprocess
import sys

import pytest
import torch
from helpers_train import REPO, cli_args, make_dataset, make_teacher, subprocess_env

from latent.reader import read_manifest
from sida_edm2.train.data import LabelSampler, derived_seed, draw_step_noise, open_real_data


def test_labels_follow_the_class_counts_and_are_uniform_without_them():
    gen = torch.Generator().manual_seed(0)
    counts = [0, 1, 0, 3]
    labels = LabelSampler(4, counts, torch.device("cpu")).sample(40_000, gen)
    assert labels.shape == (40_000, 4) and torch.equal(labels.sum(1), torch.ones(40_000))
    freq = labels.mean(0)
    assert freq[0] == 0 and freq[2] == 0 and abs(freq[3] - 0.75) < 0.01
    uniform = LabelSampler(4, None, torch.device("cpu")).sample(40_000, gen).mean(0)
    assert torch.allclose(uniform, torch.full([4], 0.25), atol=0.01)
    assert LabelSampler(0, None, torch.device("cpu")).sample(3, gen) is None
    with pytest.raises(ValueError, match="3 classes, the networks 4"):
        LabelSampler(4, [1, 1, 1], torch.device("cpu"))


def test_micro_batches_are_slices_of_one_step_draw():
    sampler = LabelSampler(10, None, torch.device("cpu"))
    step, again = (
        draw_step_noise(torch.Generator().manual_seed(1), 6, [4, 2, 2], uniform_level=True, labels=sampler)
        for _ in range(2)
    )
    second = step.micro_batch(1, 3)
    assert torch.equal(second.z, step.z[3:]) and torch.equal(second.labels, step.labels[3:])
    assert torch.equal(second.eps, again.eps[3:]) and torch.equal(second.level, again.level[3:])
    assert 0 <= step.level.min() and step.level.max() < 1  # uniform t for the generator update


def test_real_data_is_a_function_of_seed_rank_and_segment(tmp_path):
    data = make_dataset(tmp_path / "data", num_samples=32)
    num_classes = read_manifest(data)["num_classes"]

    def batches(rank, segment, count=3):
        loader = open_real_data(str(data), 4, rank=rank, world_size=2, seed=7, segment=segment, num_workers=0)
        stream = iter(loader)
        return [next(stream) for _ in range(count)]

    first = batches(rank=0, segment=0)
    assert all(x.shape == (4, 4, 16, 16) and c.shape == (4, num_classes) for x, c in first)
    for (x0, c0), (x1, c1) in zip(first, batches(rank=0, segment=0), strict=True):
        assert torch.equal(x0, x1) and torch.equal(c0, c1)  # the same segment again: the same batches
    assert not torch.equal(first[0][0], batches(rank=0, segment=1)[0][0])
    assert not torch.equal(first[0][0], batches(rank=1, segment=0)[0][0])
    assert len({derived_seed(7, r, s) for r in range(4) for s in range(4)}) == 16


def train_on(tmp_path, data):
    """train_edm2.py, one plain process, two SiDA iterations on `data`; the finished process."""
    teacher = make_teacher(tmp_path / "teacher.safetensors")
    flags = dict(
        method="sida", zero_stage=2, batch=8, batch_gpu=4, max_kimg=0.016, checkpoint_kimg=0.016,
        tick_kimg=0.008, fake_only_kimg=0, sid_only_kimg=0.008,
    )  # fmt: skip
    args = [sys.executable, "train_edm2.py", *cli_args(teacher, tmp_path / "run", data, **flags)]
    return subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_training_on_data_without_a_readable_sample_stops_with_one_line(tmp_path):
    data = make_dataset(tmp_path / "data")
    for shard in data.glob("*.tar"):
        shard.write_bytes(b"\0" * shard.stat().st_size)
    proc = train_on(tmp_path, data)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"Error: no training sample could be read from {data}" in proc.stderr


@pytest.mark.slow
def test_unreadable_shards_are_counted_in_log_and_stats(tmp_path):
    data = make_dataset(tmp_path / "data")
    for shard in sorted(data.glob("*.tar"))[1:]:  # three shards of four: the first batches meet some
        shard.write_bytes(b"not a tar")
    proc = train_on(tmp_path, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    shards = sum(r["skipped/unreadable_shards/count"] for r in records)
    assert shards > 0 and all(r["skipped/unreadable_samples/count"] == 0 for r in records)
    assert "unreadable shards" in (tmp_path / "run" / "log.txt").read_text()
