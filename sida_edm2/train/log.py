"""Feedback of a distillation run: per-tick progress line, stats.jsonl, TensorBoard (sample grids:
sida_edm2.sample.grids).

    stats = TickStats(device)
    stats.add("loss/fake_score", per_sample_sum, num_samples)    # device tensors, no host sync
    values = stats.reduce()                                      # all ranks (collective), once per tick
    log = RunLog(run_dir, rank)                                  # rank 0 writes; other ranks' calls no-op
    log.tick(values)                                             # progress line + jsonl + TensorBoard

Scalars are accumulated on the device and reduced across ranks once per tick, so logging adds no
synchronisation to the iterations themselves.
"""

import json
import os
from pathlib import Path

import torch


class TickStats:
    """Sums of per-sample values and their counts since the last reduce(), per name."""

    def __init__(self, device: torch.device):
        self.device = device
        self._sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, name: str, total: torch.Tensor | float, count: torch.Tensor | float = 1) -> None:
        """Add `total` (a sum over `count` samples); reduce() reports total/count over all ranks."""
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        old_total, old_count = self._sums.get(name, (zero, zero))
        self._sums[name] = (
            old_total + torch.as_tensor(total, device=self.device).detach().double(),
            old_count + torch.as_tensor(count, device=self.device).double(),
        )

    def reduce(self) -> dict[str, float]:
        """Means over all ranks since the last call ({name: total/count}, names ending in "/count" keep
        the plain total). Collective: every rank must call it with the same names added."""
        names = sorted(self._sums)
        if not names:
            return {}
        flat = torch.stack([torch.stack(self._sums[n]) for n in names])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat)
        self._sums = {}
        out = {}
        for name, (total, count) in zip(names, flat.tolist(), strict=True):
            out[name] = total if name.endswith("/count") else total / max(count, 1.0)
        return out


class RunLog:
    """Rank 0's outputs under the run directory: log.txt, stats.jsonl, tensorboard/, grids/."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, tensorboard: bool = True):
        self.enabled = rank == 0
        self.run_dir = Path(run_dir)
        self._tb = None
        if self.enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        print(text, flush=True)
        with open(self.run_dir / "log.txt", "a") as f:
            f.write(text + "\n")

    def tick(self, values: dict) -> None:
        """One progress line, one stats.jsonl record and TensorBoard scalars (x axis: kimg)."""
        if not self.enabled:
            return
        self.message(progress_line(values))
        with open(self.run_dir / "stats.jsonl", "a") as f:
            f.write(json.dumps(values) + "\n")
        if self._tb is not None:
            step = int(values["nimg"])
            for name, value in values.items():
                if isinstance(value, (int, float)) and name not in ("nimg", "iteration"):
                    self._tb.add_scalar(name, value, global_step=step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def progress_line(v: dict) -> str:
    """kimg, s/kimg, img/s, phase, each loss, skipped samples/steps, unreadable shards/samples of the
    data (runs that read it), GPU memory."""
    parts = [
        f"kimg {v['kimg']:<9.3f}",
        f"iter {v['iteration']:<7d}",
        f"phase {v['phase']:<9s}",
        f"s/kimg {v['sec_per_kimg']:<7.2f}",
        f"img/s {v['img_per_sec']:<8.1f}",
    ]
    for name in sorted(k for k in v if k.startswith("loss/")):
        parts.append(f"{name[5:]} {v[name]:<10.4g}")
    parts.append(f"skipped samples {int(v.get('skipped/samples/count', 0))}")
    parts.append(f"steps {int(v.get('skipped/steps/count', 0))}")
    if "skipped/unreadable_shards/count" in v:
        parts.append(f"unreadable shards {int(v['skipped/unreadable_shards/count'])}")
        parts.append(f"samples {int(v['skipped/unreadable_samples/count'])}")
    if "gpu_mem_gb" in v:
        parts.append(f"gpumem {v['gpu_mem_gb']:.2f}GB")
    return "  ".join(parts)


def tick_values(stats: dict, trainer, phase: str, elapsed: float, maintenance: float, images: int) -> dict:
    """One tick's record: the reduced stats plus progress, speed (maintenance time excluded), skipped
    steps so far and the peak GPU memory since the last tick."""
    train_time = max(elapsed - maintenance, 1e-9)
    values = {
        **stats,
        "kimg": trainer.nimg / 1000,
        "nimg": trainer.nimg,
        "iteration": trainer.iteration,
        "phase": phase,
        "sec_per_kimg": train_time / max(images / 1000, 1e-9),
        "img_per_sec": images / train_time,
        "maintenance_sec": maintenance,
        "skipped_steps_g": trainer.skipped["steps_g"],
        "skipped_steps_f": trainer.skipped["steps_f"],
    }
    if trainer.device.type == "cuda":
        values["gpu_mem_gb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
        torch.cuda.reset_peak_memory_stats(trainer.device)
    return values
