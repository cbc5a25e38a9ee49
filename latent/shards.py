"""Writing latent shards (webdataset tars) and their manifest.json.

`write_shard` writes one shard atomically (to `<name>.tmp`, then renamed) and returns its record; a
record is what the manifest lists per shard. `write_latent_shards` writes a whole dataset from an
iterable of `LatentSample`s in one process; `write_synthetic_dataset` does the same from arrays, which
is how tests and the demo make latent datasets without a VAE:

    from latent.shards import write_synthetic_dataset
    write_synthetic_dataset("demo-out/latents", mean, std, labels, num_classes=10, shard_size=64)

encode_dataset.py uses the same `write_shard` and `build_manifest` (see latent/encode_job.py).
"""

import hashlib
import os
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import numpy as np
import webdataset as wds

from latent.manifest import MANIFEST, build_manifest, write_json_atomic
from latent.scaling import FINAL_STD, RAW_STD
from latent.shard_format import STORAGE_DTYPES, LatentSample, sample_to_entries


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fp16_error(samples: list[LatentSample]) -> dict:
    """Worst rounding error of storing these moments as float16 (raw and in EDM2's scaled space)."""
    scale = FINAL_STD / np.asarray(RAW_STD, dtype=np.float64).reshape(-1, 1, 1)
    worst = {"mean_max_abs": 0.0, "mean_max_abs_scaled": 0.0, "std_max_abs": 0.0, "std_max_rel": 0.0}
    for s in samples:
        for mean, std in [(s.mean, s.std), (s.mean_flip, s.std_flip)]:
            if mean is None:
                continue
            mean_err = np.abs(mean.astype(np.float16).astype(np.float64) - mean)
            std_err = np.abs(std.astype(np.float16).astype(np.float64) - std)
            positive = std > 0
            rel = float((std_err[positive] / std[positive]).max()) if positive.any() else 0.0
            worst["mean_max_abs"] = max(worst["mean_max_abs"], float(mean_err.max()))
            worst["mean_max_abs_scaled"] = max(worst["mean_max_abs_scaled"], float((mean_err * scale).max()))
            worst["std_max_abs"] = max(worst["std_max_abs"], float(std_err.max()))
            worst["std_max_rel"] = max(worst["std_max_rel"], rel)
    return worst


def write_shard(path: str | os.PathLike, samples: list[LatentSample], storage_dtype: str = "float32") -> dict:
    """Write `samples` to the tar `path` atomically; returns the shard's record for the manifest."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, not {storage_dtype!r}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        # mtime fixed: the same samples give a byte-identical shard (and sha256) when a shard is redone.
        with wds.TarWriter(f, encoder=False, mtime=0.0) as writer:
            for sample in samples:
                writer.write(sample_to_entries(sample, storage_dtype))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    class_counts: dict[str, int] = {}
    for sample in samples:
        if sample.label >= 0:
            class_counts[str(sample.label)] = class_counts.get(str(sample.label), 0) + 1
    record = {
        "name": path.name,
        "num_samples": len(samples),
        "sha256": sha256_file(path),
        "class_counts": class_counts,
    }
    if storage_dtype == "float16":
        record["fp16_error"] = _fp16_error(samples)
    return record


def write_latent_shards(
    dest: str | os.PathLike,
    samples: Iterable[LatentSample],
    *,
    num_classes: int,
    shard_size: int = 1000,
    storage_dtype: str = "float32",
    classes: list[str] | None = None,
    resolution: int | None = None,
    vae: dict | None = None,
    source: dict | None = None,
) -> dict:
    """Write all `samples` as shards of `shard_size` plus manifest.json into `dest`; returns the manifest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    iterator = iter(samples)
    records, latent_shape, has_flip = [], None, False
    while chunk := list(islice(iterator, shard_size)):
        latent_shape = latent_shape or list(chunk[0].mean.shape)
        has_flip = has_flip or chunk[0].mean_flip is not None
        records.append(write_shard(dest / shard_name(len(records)), chunk, storage_dtype))
    if not records:
        raise ValueError("no samples to write")
    manifest = build_manifest(
        records,
        num_classes=num_classes,
        latent_shape=latent_shape,
        storage_dtype=storage_dtype,
        has_flip=has_flip,
        shard_size=shard_size,
        classes=classes,
        resolution=resolution,
        vae=vae,
        source=source,
    )
    write_json_atomic(dest / MANIFEST, manifest)
    return manifest


def write_synthetic_dataset(
    dest: str | os.PathLike,
    mean: np.ndarray,
    std: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    shard_size: int = 1000,
    storage_dtype: str = "float32",
) -> dict:
    """A valid latent dataset from arrays: mean/std [N, 4, h, w] raw moments, labels [N] (-1 = none)."""
    mean, std, labels = np.asarray(mean, np.float32), np.asarray(std, np.float32), np.asarray(labels)
    if mean.ndim != 4 or mean.shape != std.shape or labels.shape != (mean.shape[0],):
        raise ValueError(
            f"need mean/std [N,C,h,w] and labels [N]; got {mean.shape}, {std.shape}, {labels.shape}"
        )
    if num_classes > 0 and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) for a labelled dataset")
    samples = (
        LatentSample(
            key=f"synthetic{i:08d}",
            mean=mean[i],
            std=std[i],
            label=int(labels[i]) if num_classes else -1,
            info={"source": "synthetic"},
        )
        for i in range(mean.shape[0])
    )
    return write_latent_shards(
        dest,
        samples,
        num_classes=num_classes,
        shard_size=shard_size,
        storage_dtype=storage_dtype,
        resolution=mean.shape[-1] * 8,
        source={"kind": "synthetic"},
    )
