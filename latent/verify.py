"""`encode_dataset.py --verify`: re-read every shard and check it against manifest.json.

    from latent.verify import verify_dataset
    problems = verify_dataset("/data/latents")   # [] when the dataset is sound

Checked: each listed shard exists with the recorded sha256 and sample count; every sample parses, has
mean/std (and flipped moments exactly when has_flip) of the manifest's shape and stored dtype, finite
values, std >= 0, a label in range (or none in an unlabelled set); keys are unique over the dataset;
the totals and class counts match the manifest.
"""

import os
from pathlib import Path

import numpy as np
import webdataset as wds

from latent.manifest import read_manifest
from latent.shard_format import MEAN, MEAN_FLIP, STD, STD_FLIP, entries_to_sample, load_npy
from latent.shards import sha256_file


def _check_sample(entries: dict, manifest: dict, problems: list[str]) -> int:
    """Checks one sample; returns its label (-1 if none or unusable)."""
    key = entries.get("__key__")
    try:
        sample = entries_to_sample(entries)
    except Exception as exn:  # any parse failure is a finding, not a crash
        problems.append(f"{key}: unreadable sample ({type(exn).__name__}: {exn})")
        return -1
    shape = tuple(manifest["latent_shape"])
    names = [MEAN, STD] + ([MEAN_FLIP, STD_FLIP] if manifest["has_flip"] else [])
    if (MEAN_FLIP in entries) != manifest["has_flip"]:
        problems.append(f"{key}: flipped moments {'present' if MEAN_FLIP in entries else 'missing'}")
    for name in names:
        if name not in entries:
            continue
        stored = load_npy(entries[name])
        if stored.dtype != np.dtype(manifest["dtype"]) or stored.shape != shape:
            problems.append(
                f"{key}.{name}: {stored.dtype} {list(stored.shape)}, "
                f"manifest says {manifest['dtype']} {list(shape)}"
            )
        if not np.isfinite(stored).all():
            problems.append(f"{key}.{name}: non-finite values")
    if (sample.std < 0).any():
        problems.append(f"{key}: negative std")
    num_classes = manifest["num_classes"]
    if num_classes and not 0 <= sample.label < num_classes:
        problems.append(f"{key}: label {sample.label} outside [0, {num_classes})")
    if not num_classes and sample.label != -1:
        problems.append(f"{key}: label {sample.label} in an unlabelled dataset")
    return sample.label


def verify_dataset(shard_dir: str | os.PathLike) -> list[str]:
    """All problems found (empty list: the shards match the manifest)."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    problems: list[str] = []
    keys: set[str] = set()
    class_counts = [0] * manifest["num_classes"]
    total = 0
    for shard in manifest["shards"]:
        path = shard_dir / shard["name"]
        if not path.is_file():
            problems.append(f"{shard['name']}: missing")
            continue
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 differs from the manifest")
        count = 0
        try:
            for entries in wds.tarfile_samples([{"url": str(path)}]):
                count += 1
                if entries["__key__"] in keys:
                    problems.append(f"{shard['name']}: duplicate key {entries['__key__']}")
                keys.add(entries["__key__"])
                label = _check_sample(entries, manifest, problems)
                if 0 <= label < len(class_counts):
                    class_counts[label] += 1
        except Exception as exn:  # a truncated or corrupt tar
            problems.append(f"{shard['name']}: unreadable tar ({type(exn).__name__}: {exn})")
        if count != shard["num_samples"]:
            problems.append(f"{shard['name']}: {count} samples, manifest says {shard['num_samples']}")
        total += count
    if total != manifest["num_samples"]:
        problems.append(f"{total} samples in the shards, manifest says {manifest['num_samples']}")
    if class_counts != list(manifest["class_counts"]):
        problems.append("class counts differ from the manifest")
    return problems
