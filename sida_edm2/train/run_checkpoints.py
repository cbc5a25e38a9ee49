"""Checkpoints of a distillation run: written atomically, the newest K kept, resumed by rerunning.

Layout under <run-dir>:

    checkpoints/latest                  name of the newest complete checkpoint (replaced last)
    checkpoints/ckpt-<iteration:08d>/   G/ and F/ (DeepSpeed checkpoints of both engines, optimizer
                                        included), ema.pt, state.json (counters, configuration),
                                        rng-rank<r>.pt (every RNG state of rank r)
    export-<kimg:07d>.safetensors/.json the EMA generator at each checkpoint (network_files.save_export)
    export-latest.safetensors/.json     the newest of those (decode_samples.py looks for this name)

A checkpoint is assembled in checkpoints/.tmp-<name>/ and renamed when every rank has written its part,
then `latest` is replaced, then the exports are written; a run killed at any point leaves the previous
checkpoint intact. A rerun resumes from the newest complete checkpoint directory (`latest` is only
rewritten to name it, never trusted over the directories) and rewrites that checkpoint's exports from
its EMA, so a kill between the checkpoint and its exports, or a rerun of a finished run, leaves the
exports an uninterrupted run would have. A checkpoint with a missing file is skipped; one with a
truncated or unreadable file stops the run with an error naming the file; checkpoints that exist but
are all incomplete stop it too (it never starts over them).
"""

import json
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from sida_edm2.train.config import RESUME_MUST_MATCH, ConfigError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.json"
EMA = "ema.pt"
ENGINE_TAGS = {"G": "generator", "F": "fake score"}


class ResumeError(ConfigError):
    """The run directory holds checkpoints that cannot be resumed from; nothing was changed."""


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_name(iteration: int) -> str:
    return f"ckpt-{iteration:08d}"


def export_path(run_dir: str | os.PathLike, nimg: int | None) -> Path:
    """export-<kimg:07d>.safetensors, or export-latest.safetensors for nimg None."""
    name = "export-latest" if nimg is None else f"export-{nimg // 1000:07d}"
    return Path(run_dir) / f"{name}.safetensors"


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of the run, or None when it has no checkpoint at all.

    Raises ResumeError when the newest checkpoint that has all its files holds a truncated or
    unreadable one, and when checkpoints exist but none is complete."""
    root = checkpoint_root(run_dir)
    candidates = sorted((p for p in root.glob("ckpt-*") if p.is_dir()), reverse=True)
    skipped = []
    for path in candidates:
        missing = _missing_file(path)
        if missing is None:
            return path
        skipped.append(f"{path.name} lacks {missing}")
    if skipped:
        raise ResumeError(
            f"{root} holds checkpoints but none is complete ({'; '.join(skipped)}): refusing to start over "
            "them; move them away or use a new --run-dir"
        )
    return None


def read_pointer(run_dir: str | os.PathLike) -> str | None:
    """What `latest` names, or None when it is missing or unreadable."""
    try:
        return (checkpoint_root(run_dir) / LATEST).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def write_pointer(run_dir: str | os.PathLike, name: str) -> None:
    _write_text_atomic(checkpoint_root(run_dir) / LATEST, name)


def _expected_files(path: Path, state: dict) -> list[Path]:
    config = state.get("config", {})
    tags = ["F"] if config.get("method") == "edm2" else ["G", "F"]
    ranks = range(int(config.get("world_size", 1)))
    return [path / EMA, *(path / f"rng-rank{r:05d}.pt" for r in ranks), *(path / tag for tag in tags)]


def _missing_file(path: Path) -> str | None:
    """The first file that `path` lacks (None: all there); ResumeError when one is there but damaged."""
    state_file = path / STATE
    if not state_file.is_file():
        return STATE
    try:
        state = json.loads(state_file.read_text())
        if not isinstance(state, dict) or not {"nimg", "iteration", "segment", "config"} <= state.keys():
            raise ValueError("not a checkpoint state")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ResumeError(f"damaged checkpoint file {state_file}: {err}") from None
    for expected in _expected_files(path, state):
        if not expected.exists() or (expected.is_dir() and not any(expected.iterdir())):
            return expected.name
    # torch.save writes zip archives, whose directory is at the end: a truncated file has none.
    for file in sorted(path.rglob("*.pt")):
        try:
            zipfile.ZipFile(file).close()
        except (OSError, zipfile.BadZipFile) as err:
            raise ResumeError(f"damaged checkpoint file {file} (truncated or unreadable: {err})") from None
    return None


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
        write_pointer(run_dir, name)
        _prune(root, keep, protect=name)
    torch.distributed.barrier()
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    names = sorted(p.name for p in root.glob("ckpt-*") if p.is_dir())
    for name in names[: max(0, len(names) - keep)]:
        if name != protect:
            shutil.rmtree(root / name)


def remove_partial_files(run_dir: str | os.PathLike) -> None:
    """Delete what a killed run left half-written (rank 0, before anyone writes): checkpoints/.tmp-*
    directories, the pointer's temporary file and the exports' (.export-*.tmp-*)."""
    for path in checkpoint_root(run_dir).glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in [*checkpoint_root(run_dir).glob(f"{LATEST}.tmp"), *Path(run_dir).glob(".export-*.tmp-*")]:
        path.unlink(missing_ok=True)


def read_state(path: Path) -> dict:
    with open(path / STATE) as f:
        return json.load(f)


def load_checkpoint(path: Path, engines: dict, ema, rank: int) -> dict:
    """Load both engines (weights, optimizer, loss scaler, step counters), the EMA (rank 0) and return
    this rank's RNG states (collective). A file that cannot be read gives a ResumeError naming it."""
    for tag, engine in engines.items():
        try:
            loaded, _ = engine.load_checkpoint(
                str(path), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as err:
            what = ENGINE_TAGS.get(tag, tag)
            raise ResumeError(f"cannot load the {what} from {path / tag}: {err}") from None
        if loaded is None:
            raise ResumeError(f"could not load the {ENGINE_TAGS.get(tag, tag)} from {path / tag}")
    if ema is not None:
        ema.load_state_dict(_torch_load(path / EMA))
    rng_file = path / f"rng-rank{rank:05d}.pt"
    if not rng_file.is_file():
        raise ResumeError(f"{rng_file} missing: the checkpoint was written by fewer ranks")
    return _torch_load(rng_file)


def _torch_load(file: Path):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise ResumeError(f"damaged checkpoint file {file}: {err}") from None


def write_exports(module: torch.nn.Module, run_dir: str | os.PathLike, nimg: int) -> Path:
    """Export the (EMA) generator as export-<kimg>.safetensors and export-latest.safetensors (+ .json)."""
    from sida_edm2.io.network_files import save_export

    path = export_path(run_dir, nimg)
    save_export(module, path)
    save_export(module, export_path(run_dir, None))
    return path
