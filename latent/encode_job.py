"""The encoding job behind encode_dataset.py: source -> (VAE) -> shards, resumable, one or many ranks.

    from latent.encode_job import EncodeOptions, run_encode
    manifest = run_encode(EncodeOptions(source="/data/imagenet/train", dest="/data/latents"))

Under torchrun every rank runs this; ranks encode disjoint shards (see latent/encode_plan.py), meet at a
gloo barrier, and rank 0 writes manifest.json. Unusable files are skipped, logged (logs/encode-rank<r>.log)
and listed in the manifest; nothing stops the job short of an unusable source or destination.
"""

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from latent.dir_lock import DirectoryInUseError, lock_directory, unlock_directory
from latent.encode_plan import (
    LOGS,
    EncodeError,
    EncodePlan,
    check_or_write_plan,
    listing_sha256,
    load_records,
    pending_shards,
    prepare_dest,
    record_path,
)
from latent.host_copy import HostCopy
from latent.manifest import MANIFEST, build_manifest, write_json_atomic
from latent.shard_format import LatentSample
from latent.shards import shard_name, write_shard
from latent.vae import DEFAULT_VAE, downsampling_factor, encode_moments, load_vae, vae_revision
from preprocess.prepared import PreparedItems, collate_prepared
from preprocess.sources import Source, open_source, spread_subset

log = logging.getLogger("encode_dataset")
# Seconds to sleep after each batch: lets the resume test kill a run reliably in the middle.
DELAY_ENV = "ENCODE_DATASET_TEST_DELAY_S"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EDM2_VAE = {"id": DEFAULT_VAE, "revision": "as encoded by EDM2 (imported .npy)", "encode_dtype": "float32"}


@dataclass
class EncodeOptions:
    source: str  # image folder / .zip / .tar, or an EDM2 img512-sd.zip
    dest: str  # shard directory (created)
    vae: str = DEFAULT_VAE  # hub id or local directory
    resolution: int = 512  # output image size of the crop (latents are resolution/8)
    batch_size: int = 32  # images per VAE call
    workers: int | None = None  # image-decoding worker processes (None: default_workers())
    shard_size: int = 1000  # source items per shard
    dtype: str = "float32"  # VAE compute dtype: float32, or bfloat16 (GPU only)
    storage_dtype: str = "float32"  # dtype of the stored moments: float32 or float16
    flip: bool = False  # also store the moments of the horizontally flipped image
    limit: int | None = None  # encode only this many items, spread evenly over the source
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", ...
    progress: bool = True  # show a tqdm bar (rank 0)
    channels_last: bool = False  # channels-last VAE memory layout on CUDA (NCHW measured faster)
    compile: bool = False  # torch.compile the VAE encoder for the batch's fixed shape


def default_workers() -> int:
    """Decoding processes per rank: this process's cores, shared by the ranks of the node, one left for
    the rank itself (JPEG decoding plus the bicubic resize is the CPU's whole share of the work)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(16, cores // ranks_here - 1))


def _rank_and_world() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def _device(option: str, local_rank: int) -> torch.device:
    if option == "auto":
        option = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(option)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _attach_log_file(dest: Path, rank: int) -> logging.Handler:
    handler = logging.FileHandler(dest / LOGS / f"encode-rank{rank}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _make_plan(source: Source, items: list, options: EncodeOptions) -> EncodePlan:
    images = source.kind == "images"
    # After load_vae: a hub id's commit is known once its files are in the local cache.
    return EncodePlan(
        source=str(Path(options.source).resolve()),
        source_kind=source.kind,
        num_items=len(items),
        items_sha256=listing_sha256(items),
        shard_size=options.shard_size,
        resolution=options.resolution if images else None,
        vae=options.vae if images else None,
        vae_weights=vae_revision(options.vae) if images else None,
        dtype=options.dtype if images else None,
        storage_dtype=options.storage_dtype,
        flip=options.flip,
        limit=options.limit,
    )


class _ShardAccumulator:
    """Collects one shard's samples and bookkeeping until all its planned items have been seen."""

    def __init__(self, num_items: int):
        self.remaining, self.num_items = num_items, num_items
        self.samples: list[LatentSample] = []
        self.skipped: list[dict] = []
        self.upscaled = 0
        self.modes: dict[str, int] = {}


def _submit_batch(batch: dict, vae, options: EncodeOptions) -> tuple[list[dict], HostCopy | None]:
    """Queue a batch's VAE work; returns its usable records and the pending copy of their moments.

    The moments come back as [means, stds] (plus the flipped pair with --flip) once `copy.wait()`
    returns; EDM2 imports carry their moments in the records and need no VAE (copy None)."""
    usable = [r for r in batch["records"] if r["reason"] is None]
    if not usable or "moments" in usable[0]:
        return usable, None
    pad_to = options.batch_size if options.compile else None  # one shape for the compiled encoder
    device = next(vae.parameters()).device
    pixels = batch["pixels"].to(device, non_blocking=True)  # pinned by the DataLoader: asynchronous
    moments = list(encode_moments(vae, pixels, pad_to))
    if options.flip:
        moments += encode_moments(vae, pixels.flip(-1), pad_to)
    return usable, HostCopy(moments)


def _moments_of_batch(usable: list[dict], copy: HostCopy | None) -> list[list]:
    """[means, stds, flipped means, flipped stds], one entry per usable record (None: not stored)."""
    none = [None] * len(usable)
    if copy is None:  # EDM2 import: each array is [mean; std] along the channels
        half = usable[0]["moments"].shape[0] // 2
        return [[r["moments"][:half] for r in usable], [r["moments"][half:] for r in usable], none, none]
    arrays = [list(a) for a in copy.wait()]
    return arrays if len(arrays) == 4 else [*arrays, none, none]


def _samples_from_batch(
    records: list[dict], usable: list[dict], copy: HostCopy | None
) -> list[tuple[dict, LatentSample | None]]:
    """Prepared records -> samples (None for a record skipped as unusable), in batch order."""
    samples = {}
    if usable:
        for r, arrays in zip(usable, zip(*_moments_of_batch(usable, copy), strict=True), strict=True):
            if not all(a is None or np.isfinite(a).all() for a in arrays):
                r["reason"] = "non-finite VAE output"
                continue
            item = r["item"]
            mean, std, mean_flip, std_flip = arrays
            info = {"source": item.path, **r["info"]}
            samples[r["index"]] = LatentSample(item.key, mean, std, item.label, mean_flip, std_flip, info)
    return [(r, samples.get(r["index"])) for r in records]


def _finish_shard(dest: Path, index: int, acc: _ShardAccumulator, storage_dtype: str) -> None:
    record = write_shard(dest / shard_name(index), acc.samples, storage_dtype)
    record.update(
        num_source_files=acc.num_items,
        skipped=acc.skipped,
        num_upscaled=acc.upscaled,
        converted_modes=acc.modes,
        latent_shape=list(acc.samples[0].mean.shape) if acc.samples else None,
    )
    write_json_atomic(record_path(dest, index), record)  # last: its existence marks the shard complete


class _ShardWriter:
    """Writes finished shards on a thread, so tar writing, fsync and hashing overlap the GPU's work.

    At most `max_pending` shards wait in memory (submit blocks beyond). `close` writes every shard
    handed over, also when the encoding loop stopped on an error (those shards are complete), then
    re-raises the thread's first error. A shard counts as done only once its record is written, so a
    kill while shards wait here leaves them pending for the rerun, as before."""

    def __init__(self, dest: Path, storage_dtype: str, max_pending: int = 2):
        self.dest, self.storage_dtype = dest, storage_dtype
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:  # after an error, drain the queue without writing
                try:
                    _finish_shard(self.dest, *job, self.storage_dtype)
                except BaseException as exn:  # re-raised in the encoding thread
                    self._error = exn

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, index: int, acc: _ShardAccumulator) -> None:
        self._raise_error()
        self._queue.put((index, acc))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_error()


def _encode_shards(source, plan, items, shards, dest, options, vae, rank) -> None:
    work = [(s, item) for s in shards for item in plan.shard_items(items, s)]
    accumulators = {s: _ShardAccumulator(len(plan.shard_items(items, s))) for s in shards}
    dataset = PreparedItems(source, [item for _, item in work], options.resolution)
    workers = default_workers() if options.workers is None else options.workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=options.batch_size,
        num_workers=workers,
        collate_fn=collate_prepared,
        prefetch_factor=2 if workers else None,  # 2 batches per worker keep the GPU fed
        pin_memory=vae is not None and next(vae.parameters()).is_cuda,  # asynchronous host-to-GPU copies
    )
    delay = float(os.environ.get(DELAY_ENV, 0))
    bar = tqdm(total=len(work), unit="img", disable=not options.progress or rank != 0, desc=f"rank {rank}")
    skipped_total = 0
    writer = _ShardWriter(dest, options.storage_dtype)

    def store(records: list[dict], usable: list[dict], copy: HostCopy | None) -> None:
        nonlocal skipped_total
        for record, sample in _samples_from_batch(records, usable, copy):
            shard = work[record["index"]][0]
            acc = accumulators[shard]
            if sample is None:
                acc.skipped.append({"path": record["item"].path, "reason": record["reason"]})
                log.warning("skipped %s: %s", record["item"].path, record["reason"])
                skipped_total += 1
            else:
                acc.samples.append(sample)
                acc.upscaled += bool(record["upscaled"])
                if record["mode"] not in (None, "RGB"):
                    acc.modes[record["mode"]] = acc.modes.get(record["mode"], 0) + 1
            acc.remaining -= 1
            if acc.remaining == 0:
                writer.submit(shard, accumulators.pop(shard))
        bar.update(len(records))
        bar.set_postfix(skipped=skipped_total, refresh=False)

    # One batch in flight: batch n+1's encoder kernels are queued before batch n's moments are
    # awaited, so the GPU works while the host stores batch n and fetches the next batch.
    pending = None
    try:
        for batch in loader:
            submitted = (batch["records"], *_submit_batch(batch, vae, options))
            if pending is not None:
                store(*pending)
            pending = submitted
            if delay:
                time.sleep(delay)
        if pending is not None:
            store(*pending)
    finally:
        writer.close()
    bar.close()


def _write_manifest(dest: Path, source: Source, plan: EncodePlan, options: EncodeOptions) -> dict:
    records = load_records(dest, plan)
    shapes = [r["latent_shape"] for r in records if r["latent_shape"]]
    if not shapes:
        raise EncodeError(f"none of the {plan.num_items} source files could be used; see {dest / LOGS}")
    images = source.kind == "images"
    vae = {"id": options.vae, "revision": vae_revision(options.vae), "encode_dtype": options.dtype}
    manifest = build_manifest(
        records,
        num_classes=source.num_classes,
        classes=source.classes,
        latent_shape=shapes[0],
        storage_dtype=plan.storage_dtype,
        has_flip=plan.flip,
        shard_size=plan.shard_size,
        resolution=options.resolution if images else shapes[0][-1] * 8,
        vae=vae if images else EDM2_VAE,
        source={**source.describe(), "limit": plan.limit},
    )
    # Files excluded while listing (e.g. no label in dataset.json) are skipped files too.
    manifest["skipped"] = source.skipped + manifest["skipped"]
    manifest["num_skipped"] = len(manifest["skipped"])
    manifest["num_source_files"] += len(source.skipped)
    write_json_atomic(dest / MANIFEST, manifest)
    log.info("wrote %s: %d samples in %d shards", dest / MANIFEST, manifest["num_samples"], plan.num_shards)
    return manifest


def _load_checked_vae(options: EncodeOptions, device: torch.device):
    """The VAE, once it is known to represent --resolution exactly (EncodeError otherwise)."""
    try:
        vae = load_vae(
            options.vae,
            device,
            DTYPES[options.dtype],
            channels_last=options.channels_last,
            compile=options.compile,
        )
    except OSError as exn:
        raise EncodeError(str(exn)) from None
    factor = downsampling_factor(vae)
    if options.resolution % factor:
        lower = options.resolution // factor * factor
        raise EncodeError(
            f"--resolution {options.resolution} is not a multiple of {factor}, the downsampling factor of "
            f"the VAE {options.vae}: its latents would cover only {lower} pixels; use "
            f"{max(lower, factor)} or {lower + factor}"
        )
    return vae


def run_encode(options: EncodeOptions) -> dict | None:
    """Encode (or finish encoding) a dataset; returns the manifest on rank 0, None on other ranks.

    Raises SourceError for an unusable source, EncodeError for an unusable destination or job."""
    rank, world_size, local_rank = _rank_and_world()
    source = open_source(options.source)
    if source.kind == "edm2-latents" and options.flip:
        raise EncodeError("--flip needs the images: an EDM2 latent zip stores unflipped moments only")
    device = _device(options.device, local_rank)
    if device.type == "cpu" and options.dtype != "float32":
        raise EncodeError(f"--dtype {options.dtype} is for GPUs; on CPU the VAE runs in float32")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EncodeError(f"--device {options.device}: no CUDA device is available here")
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # every batch has the same shape: pick the fastest kernels
    vae = _load_checked_vae(options, device) if source.kind == "images" else None
    dest = prepare_dest(options.dest)
    if rank == 0:
        try:
            lock_directory(dest, "encoding job")
        except DirectoryInUseError as exn:
            raise EncodeError(str(exn)) from None
    handler = _attach_log_file(dest, rank)
    try:
        items = spread_subset(source.items, options.limit)
        plan = _make_plan(source, items, options)
        check_or_write_plan(dest, plan)
        shards = pending_shards(dest, plan, rank, world_size)
        todo = f"{len(shards)} of {plan.num_shards} shards to encode"
        log.info("rank %d/%d: %s (%s)", rank, world_size, todo, device)
        if shards:
            _encode_shards(source, plan, items, shards, dest, options, vae, rank)
        if world_size > 1:
            torch.distributed.barrier()
        return _write_manifest(dest, source, plan, options) if rank == 0 else None
    finally:
        unlock_directory(dest)
        log.removeHandler(handler)
        handler.close()


def init_distributed_if_launched() -> None:
    """Under torchrun (WORLD_SIZE > 1): a gloo group, only for the final barrier (hours of skew allowed)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=12))
