"""Data-parallel ranks must not draw the same randomness: each rank of a real multi-process Trainer
gets its own real-data stream and its own noise stream (z, eps, noise levels, labels), so that the
ranks together see batch_gpu * world different samples per micro-batch, not copies of one.

The script mode (`python -m torch.distributed.run --nproc_per_node N tests/test_rank_streams.py OUT
TEACHER DATA RUN_DIR`) builds the Trainer exactly as train_edm2.py does and writes, from rank 0, what
every rank drew first."""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.helpers_train import PRESET, end_distributed_script, make_dataset, make_teacher, run_distributed  # noqa: E402


def scenario(out: str, teacher: str, data: str, run_dir: str) -> None:
    from sida_edm2.train.config import resolve_config
    from sida_edm2.train.trainer import Trainer

    cfg = resolve_config(
        PRESET, run_dir=run_dir, teacher=teacher, data=data, method="sida", num_workers=0, zero_stage=2
    )
    trainer = Trainer(cfg)
    noise = torch.Generator().set_state(trainer.noise.get_state())  # a copy: the run's own stays put
    drawn = {
        "real": torch.cat([next(trainer.data)[0] for _ in range(3)]).flatten(1).tolist(),
        "noise": torch.randn([3 * cfg.batch_gpu, 64], generator=noise).tolist(),
    }
    everyone = [None] * trainer.world_size
    torch.distributed.all_gather_object(everyone, drawn)
    if trainer.rank == 0:
        Path(out).write_text(json.dumps(everyone))
    end_distributed_script()


@pytest.mark.slow
def test_each_rank_draws_its_own_data_and_noise(tmp_path):
    teacher = make_teacher(tmp_path / "teacher.safetensors")
    data = make_dataset(tmp_path / "data", num_samples=64)
    out = tmp_path / "drawn.json"
    run_distributed(__file__, [str(out), str(teacher), str(data), str(tmp_path / "run")], nproc=2)
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    for kind in ("real", "noise"):
        rows = [{tuple(row) for row in rank[kind]} for rank in ranks]
        assert all(len(r) == len(rank[kind]) for r, rank in zip(rows, ranks, strict=True))  # within a rank
        assert not rows[0] & rows[1], f"ranks 0 and 1 share {kind} draws"  # across ranks


if __name__ == "__main__":
    scenario(*sys.argv[1:5])
