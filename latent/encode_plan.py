"""The fixed plan of an encoding job and its resume state on disk.

A job's items (the source listing, after --limit) are cut into shards of `shard_size` consecutive items:
shard i always holds items [i*S, (i+1)*S), minus the ones skipped as unusable. Shard i is encoded by
rank i % world_size, so ranks write disjoint shard names, and a shard is complete once its record
`parts/shard-<i>.json` exists (written after the tar was renamed into place). Rerunning the same
command therefore keeps completed shards, redoes partial ones, and - because the item-to-shard map
never changes - ends with every item exactly once, whatever the number of ranks of each run.

Destination layout: plan.json (what the job is; a rerun must match it), parts/ (shard records),
logs/ (one log per rank), shard-XXXXXX.tar, and manifest.json once every shard is complete.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from latent.manifest import MANIFEST, write_json_atomic
from latent.shards import shard_name
from preprocess.sources import SourceItem

PLAN = "plan.json"
PARTS = "parts"
LOGS = "logs"


class EncodeError(Exception):
    """The job cannot go on; the message says why and what to do."""


@dataclass
class EncodePlan:
    source: str  # resolved source path
    source_kind: str  # "images" or "edm2-latents"
    num_items: int  # items after --limit
    items_sha256: str  # hash of the (key, path, label) listing: a changed source is noticed
    shard_size: int  # items per shard
    resolution: int | None  # None for EDM2 latent imports (the latents fix it)
    vae: str | None  # hub id or directory (None for imports)
    vae_weights: str | None  # what identifies the weights (latent.vae.vae_revision): hub commit or sha256
    dtype: str | None  # VAE compute dtype
    storage_dtype: str  # float32 or float16
    flip: bool  # flipped moments stored too
    limit: int | None  # --limit, if any

    @property
    def num_shards(self) -> int:
        return -(-self.num_items // self.shard_size)

    def shard_items(self, items: list[SourceItem], index: int) -> list[SourceItem]:
        return items[index * self.shard_size : (index + 1) * self.shard_size]


def listing_sha256(items: list[SourceItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.key}\t{item.path}\t{item.label}\n".encode())
    return digest.hexdigest()


def prepare_dest(dest: str | os.PathLike) -> Path:
    """Create dest (and its subfolders) and prove it is writable; EncodeError if it is not."""
    dest = Path(dest)
    try:
        for folder in (dest, dest / PARTS, dest / LOGS):
            folder.mkdir(parents=True, exist_ok=True)
        probe = dest / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exn:
        raise EncodeError(f"destination {dest} is not writable: {exn.strerror or exn}") from None
    return dest


def check_or_write_plan(dest: Path, plan: EncodePlan) -> None:
    """First run: record the plan. Rerun: it must be the same job, else resuming would mix datasets."""
    path = dest / PLAN
    wanted = asdict(plan)
    if path.exists():
        with open(path) as f:
            existing = json.load(f)
        differences = [
            f"{k}: {existing.get(k)!r} -> {v!r}" for k, v in wanted.items() if existing.get(k) != v
        ]
        old_weights = existing.get("vae_weights")
        if old_weights != plan.vae_weights and existing.get("vae") == plan.vae:
            raise EncodeError(
                f"{dest} was encoded with other weights of the VAE {plan.vae} ({old_weights}, now "
                f"{plan.vae_weights}): resuming would mix latents of two VAEs. Restore the original "
                "weights to resume, or use a new --dest."
            )
        if differences:
            raise EncodeError(
                f"{dest} holds another encoding job ({'; '.join(differences)}). "
                "Rerun with the original options to resume it, or use a new --dest."
            )
        return
    write_json_atomic(path, wanted)


def record_path(dest: Path, index: int) -> Path:
    return dest / PARTS / (shard_name(index) + ".json")


def completed_shards(dest: Path, plan: EncodePlan) -> set[int]:
    return {
        i for i in range(plan.num_shards) if record_path(dest, i).exists() and (dest / shard_name(i)).exists()
    }


def pending_shards(dest: Path, plan: EncodePlan, rank: int, world_size: int) -> list[int]:
    """This rank's shards that are not complete; their leftovers from a killed run are removed."""
    done = completed_shards(dest, plan)
    pending = [i for i in range(rank, plan.num_shards, world_size) if i not in done]
    for index in pending:
        for leftover in (dest / shard_name(index), dest / (shard_name(index) + ".tmp")):
            leftover.unlink(missing_ok=True)
    if pending:
        (dest / MANIFEST).unlink(missing_ok=True)  # a manifest must never describe an unfinished set
    return pending


def load_records(dest: Path, plan: EncodePlan) -> list[dict]:
    missing = sorted(set(range(plan.num_shards)) - completed_shards(dest, plan))
    if missing:
        raise EncodeError(
            f"{len(missing)} shard(s) are not complete (first: {shard_name(missing[0])}); "
            "rerun the same command to finish them"
        )
    records = []
    for index in range(plan.num_shards):
        with open(record_path(dest, index)) as f:
            records.append(json.load(f))
    return records
