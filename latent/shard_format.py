"""What one sample of a latent shard holds, and how it is turned into tar entries and back.

Each sample of a webdataset tar shard is a group of files sharing the sample's `__key__`:

    <key>.mean.npy       posterior mean [4, h, w] (float32, or float16 when the dataset says so)
    <key>.std.npy        posterior std  [4, h, w] (same dtype)
    <key>.mean_flip.npy  optional: mean of the horizontally flipped image (present only in `--flip` datasets)
    <key>.std_flip.npy   optional: its std
    <key>.cls            class index as ASCII text (absent in unlabelled datasets)
    <key>.json           provenance: source path, original size, conversions

The stored values are *raw* VAE moments; EDM2's scaling is applied by the reader after sampling.
See latent/FORMAT.md for the manifest and the float16 error.
"""

import io
import json
import re
from dataclasses import dataclass, field

import numpy as np

FORMAT_VERSION = 1
MEAN = "mean.npy"
STD = "std.npy"
MEAN_FLIP = "mean_flip.npy"
STD_FLIP = "std_flip.npy"
CLS = "cls"
INFO = "json"
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}
# webdataset splits a member name at the first "." of its base name, so a key may not contain one.
_KEY_OK = re.compile(r"^[^.\s]+$")


@dataclass
class LatentSample:
    """One encoded image (raw posterior moments, float32 in memory whatever the storage dtype)."""

    key: str  # unique within the dataset; no "." (webdataset's key/extension separator)
    mean: np.ndarray  # [C, h, w] posterior mean
    std: np.ndarray  # [C, h, w] posterior standard deviation
    label: int = -1  # class index, -1 for unlabelled data
    mean_flip: np.ndarray | None = None  # moments of the horizontally flipped image, if encoded
    std_flip: np.ndarray | None = None
    info: dict = field(default_factory=dict)  # provenance (source path, original size, ...)


def check_key(key: str) -> str:
    if not _KEY_OK.match(key) or key.startswith("_"):
        raise ValueError(
            f"invalid sample key {key!r}: it must be non-empty, without '.', spaces or a leading '_'"
        )
    return key


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def sample_to_entries(sample: LatentSample, storage_dtype: str = "float32") -> dict:
    """A LatentSample -> the dict webdataset's TarWriter writes (values are bytes)."""
    dtype = STORAGE_DTYPES[storage_dtype]
    entries = {
        "__key__": check_key(sample.key),
        MEAN: npy_bytes(sample.mean.astype(dtype)),
        STD: npy_bytes(sample.std.astype(dtype)),
        INFO: json.dumps(sample.info, sort_keys=True).encode(),
    }
    if (sample.mean_flip is None) != (sample.std_flip is None):
        raise ValueError(f"{sample.key}: flipped moments need both mean_flip and std_flip")
    if sample.mean_flip is not None:
        entries[MEAN_FLIP] = npy_bytes(sample.mean_flip.astype(dtype))
        entries[STD_FLIP] = npy_bytes(sample.std_flip.astype(dtype))
    if sample.label >= 0:
        entries[CLS] = str(int(sample.label)).encode()
    return entries


def entries_to_sample(entries: dict) -> LatentSample:
    """The inverse of `sample_to_entries` (arrays come back as float32); raises on a malformed sample."""
    has_flip = MEAN_FLIP in entries
    return LatentSample(
        key=entries["__key__"],
        mean=load_npy(entries[MEAN]).astype(np.float32),
        std=load_npy(entries[STD]).astype(np.float32),
        label=int(entries[CLS].decode()) if CLS in entries else -1,
        mean_flip=load_npy(entries[MEAN_FLIP]).astype(np.float32) if has_flip else None,
        std_flip=load_npy(entries[STD_FLIP]).astype(np.float32) if has_flip else None,
        info=json.loads(entries[INFO].decode()) if INFO in entries else {},
    )
