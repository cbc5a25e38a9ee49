"""Checkpoints of a distillation run: written atomically, the newest K kept, resumed by rerunning.

Layout under <run-dir>:

    checkpoints/latest                  name of the newest complete checkpoint (replaced last)
    checkpoints/ckpt-<iteration:08d>/   G/ and F/ (DeepSpeed checkpoints of both engines, optimizer
                                        included), ema.pt, state.json (counters, configuration),
                                        rng-rank<r>.pt (every RNG state of rank r)
    export-<kimg:07d>.safetensors/.json the EMA generator at each checkpoint (network_files.save_export)
    export-latest.safetensors/.json     the newest of those (decode_samples.py looks for this name)

A checkpoint is assembled in checkpoints/.tmp-<name>/ and renamed when every rank has written its part,
then `latest` is replaced; a run killed at any point leaves the previous checkpoint intact.
"""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from sida_edm2.train.config import RESUME_MUST_MATCH, ConfigError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.json"
EMA = "ema.pt"
ENGINE_TAGS = {"G": "generator", "F": "fake score"}


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_name(iteration: int) -> str:
    return f"ckpt-{iteration:08d}"


def export_path(run_dir: str | os.PathLike, nimg: int | None) -> Path:
    """export-<kimg:07d>.safetensors, or export-latest.safetensors for nimg None."""
    name = "export-latest" if nimg is None else f"export-{nimg // 1000:07d}"
    return Path(run_dir) / f"{name}.safetensors"


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of the run, or None for a fresh run."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / STATE).is_file():
        raise RuntimeError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def capture_rng(noise: torch.Generator) -> dict:
    """Every RNG state this rank's training draws from: Python, NumPy, torch CPU and CUDA, and the
    loop's own noise generator (as tensors and plain values, so torch.load(weights_only=True) reads it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "noise": noise.get_state(),
    }


def restore_rng(state: dict, noise: torch.Generator) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    noise.set_state(state["noise"])


def check_resume_config(saved: dict, current: dict) -> list[str]:
    """Raise ConfigError when a field of RESUME_MUST_MATCH differs; return the other changed fields."""
    fatal = [k for k in RESUME_MUST_MATCH if saved.get(k) != current.get(k)]
    if fatal:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in fatal)
        raise ConfigError(
            f"cannot resume: the run directory's checkpoint was made with a different configuration "
            f"({details}); use the original settings or a new --run-dir"
        )
    return sorted(k for k in current if k not in RESUME_MUST_MATCH and saved.get(k) != current.get(k))


def save_checkpoint(
    run_dir: str | os.PathLike,
    iteration: int,
    engines: dict,
    ema,
    state: dict,
    rng: dict,
    keep: int,
    rank: int,
) -> Path:
    """Write one checkpoint (collective: every rank calls it); returns its final directory.

    engines: {"G": engine_g, "F": engine_f} (only "F" for method edm2); ema: NetworkEMA on rank 0, None
    elsewhere; state: the JSON-serialisable counters and configuration (rank 0's is written); rng: this
    rank's capture_rng().
    """
    root = checkpoint_root(run_dir)
    name = checkpoint_name(iteration)
    final, tmp = root / name, root / f".tmp-{name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    for tag, engine in engines.items():
        engine.save_checkpoint(str(tmp), tag=tag, save_latest=False)
    torch.save(rng, tmp / f"rng-rank{rank:05d}.pt")
    if rank == 0:
        torch.save(ema.state_dict(), tmp / EMA)
        _write_text_atomic(tmp / STATE, json.dumps(state, indent=1))
    torch.distributed.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)  # a newer checkpoint of an earlier, killed attempt
        os.rename(tmp, final)
        _write_text_atomic(root / LATEST, name)
        _prune(root, keep, protect=name)
    torch.distributed.barrier()
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    names = sorted(p.name for p in root.glob("ckpt-*") if p.is_dir())
    for name in names[: max(0, len(names) - keep)]:
        if name != protect:
            shutil.rmtree(root / name)


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> None:
    """Delete .tmp-* directories a killed run left behind (rank 0, before anyone writes)."""
    for path in checkpoint_root(run_dir).glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def read_state(path: Path) -> dict:
    with open(path / STATE) as f:
        return json.load(f)


def load_checkpoint(path: Path, engines: dict, ema, rank: int) -> dict:
    """Load both engines (weights, optimizer, loss scaler, step counters), the EMA (rank 0) and return
    this rank's RNG states (collective)."""
    for tag, engine in engines.items():
        loaded, _ = engine.load_checkpoint(
            str(path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise RuntimeError(f"could not load the {ENGINE_TAGS.get(tag, tag)} from {path / tag}")
    if ema is not None:
        ema.load_state_dict(torch.load(path / EMA, map_location="cpu", weights_only=True))
    rng_file = path / f"rng-rank{rank:05d}.pt"
    if not rng_file.is_file():
        raise RuntimeError(f"{rng_file} missing: the checkpoint was written by fewer ranks")
    return torch.load(rng_file, weights_only=True)


def write_exports(module: torch.nn.Module, run_dir: str | os.PathLike, nimg: int) -> Path:
    """Export the (EMA) generator as export-<kimg>.safetensors and export-latest.safetensors (+ .json)."""
    from sida_edm2.io.network_files import save_export

    path = export_path(run_dir, nimg)
    save_export(module, path)
    save_export(module, export_path(run_dir, None))
    return path
