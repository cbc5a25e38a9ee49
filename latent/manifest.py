"""manifest.json of a latent dataset: built from per-shard records, read back by the reader and --verify.

Fields (see latent/FORMAT.md): format_version, tool, tool_version, created, source, num_samples,
num_source_files, num_skipped, skipped [{path, reason}], num_upscaled, converted_modes, num_classes,
classes, class_counts, vae {id, revision, encode_dtype}, resolution, latent_shape, dtype, has_flip,
scaling {raw_mean, raw_std, final_std}, shard_size, shards [{name, num_samples, sha256}], fp16_error.
"""

import datetime
import json
import os
from importlib import metadata
from pathlib import Path

from latent.scaling import scaling_constants
from latent.shard_format import FORMAT_VERSION

MANIFEST = "manifest.json"
TOOL = "sida-edm2 encode_dataset"
_REQUIRED = ("num_samples", "num_classes", "class_counts", "latent_shape", "dtype", "has_flip", "shards")


def tool_version() -> str:
    try:
        return metadata.version("sida-edm2")
    except metadata.PackageNotFoundError:
        return "unknown"


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: ranks may write the same (identical) file at once
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(shard_dir: str | os.PathLike) -> dict:
    """The manifest of a finished latent dataset; a clear error when there is none or it lacks fields."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: not a finished latent dataset (run encode_dataset.py, or rerun it to finish)"
        )
    with open(path) as f:
        manifest = json.load(f)
    missing = [name for name in _REQUIRED if name not in manifest]
    if missing:
        raise ValueError(f"{path} lacks the fields {missing}")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {manifest['format_version']}; this code reads {FORMAT_VERSION}"
        )
    return manifest


def build_manifest(
    records: list[dict],
    *,
    num_classes: int,
    latent_shape: list[int],
    storage_dtype: str,
    has_flip: bool,
    shard_size: int,
    classes: list[str] | None = None,
    resolution: int | None = None,
    vae: dict | None = None,
    source: dict | None = None,
) -> dict:
    """Combine shard records (written by `write_shard`, plus the encoder's per-shard bookkeeping)."""
    class_counts = [0] * num_classes
    for record in records:
        for label, count in record.get("class_counts", {}).items():
            class_counts[int(label)] += count
    skipped = [item for record in records for item in record.get("skipped", [])]
    converted: dict[str, int] = {}
    for record in records:
        for mode, count in record.get("converted_modes", {}).items():
            converted[mode] = converted.get(mode, 0) + count
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": TOOL,
        "tool_version": tool_version(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": source or {},
        "num_samples": sum(r["num_samples"] for r in records),
        "num_source_files": sum(r.get("num_source_files", r["num_samples"]) for r in records),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "num_upscaled": sum(r.get("num_upscaled", 0) for r in records),
        "converted_modes": converted,
        "num_classes": num_classes,
        "classes": classes if classes is not None else [str(i) for i in range(num_classes)],
        "class_counts": class_counts,
        "vae": vae or {},
        "resolution": resolution,
        "latent_shape": list(latent_shape),
        "dtype": storage_dtype,
        "has_flip": has_flip,
        "scaling": scaling_constants(),
        "shard_size": shard_size,
        "shards": [
            {"name": r["name"], "num_samples": r["num_samples"], "sha256": r["sha256"]} for r in records
        ],
    }
    if storage_dtype == "float16":
        manifest["fp16_error"] = {
            k: max((r["fp16_error"][k] for r in records if "fp16_error" in r), default=0.0)
            for k in ("mean_max_abs", "mean_max_abs_scaled", "std_max_abs", "std_max_rel")
        }
    return manifest
