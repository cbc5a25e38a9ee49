"""Training-time reader of latent shards: batches of (latents with EDM2's scaling, one-hot labels).

    from latent.reader import make_latent_loader
    loader = make_latent_loader("data/img512-latents", batch_size=64, rank=rank, world_size=world,
                                num_workers=4, seed=0)
    for latents, onehot in loader:   # latents float32 [64, 4, 64, 64], onehot float32 [64, 1000]
        ...

Every time a sample is read, a fresh latent `mean + randn * std` is drawn (and, when the dataset stores
flipped moments, the flipped or unflipped pair is picked with probability 1/2), then EDM2's per-channel
scaling is applied. Two modes:
- resampled (default, training): each rank and worker draws shards at random (weighted by their sample
  counts) from its own seeded generator, forever; `epoch_samples` (per rank) cuts the stream into
  epochs of `epoch_samples // batch_size` batches, like webdataset's `with_epoch`.
- resampled=False (one exact pass): the shards, shuffled by (seed, epoch) identically on every rank, are
  split explicitly by rank and then by worker, so every sample is read exactly once per epoch across
  all ranks and workers; the last batch of each worker may be short.
Seeds are (seed, epoch, rank, worker), so a run is reproducible. Unreadable shards and samples are
skipped with a warning (the first few, then every power of ten) and counted (`loader.skipped_shards`,
`loader.skipped_samples`). When a resampled stream opens shards or meets unreadable items
`failure_limit(manifest)` times in a row without decoding one sample (every shard corrupt, or empty),
iterating raises `UnreadableDataError` naming the data folder instead of trying forever. Host RAM per
worker is bounded by the shuffle buffer (compressed-as-stored samples) plus `prefetch_factor` batches,
never the dataset.
"""

import logging
import multiprocessing
import random
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from latent.manifest import read_manifest
from latent.scaling import scale_latents
from latent.shard_format import CLS, MEAN, MEAN_FLIP, STD, STD_FLIP, load_npy

__all__ = ["LatentLoader", "UnreadableDataError", "failure_limit", "make_latent_loader", "read_manifest"]
log = logging.getLogger(__name__)
WARN_FIRST = 5  # unreadable items warned about one by one; after that only every power of ten


class UnreadableDataError(ValueError):
    """No sample could be read from the data folder within a bounded number of attempts."""


def failure_limit(manifest: dict) -> int:
    """Shard openings plus unreadable shards and samples in a row, with no sample decoded between them,
    after which a resampled stream gives up. Larger than what a readable dataset gives by chance: the
    shuffle buffer opens at most 100 shards before its first sample, a shard of only bad samples fails
    at most its sample count in a row, and with 99% of the shards corrupt, 20 draws per shard in a row
    all land on corrupt ones with probability 0.99 ** 2000 ~ 2e-9."""
    shards = manifest["shards"]
    largest = max((s["num_samples"] for s in shards), default=0)
    return max(1000, 20 * len(shards) + 2 * largest)


class _CountingHandler:
    """webdataset exception handler: warn, count in a counter shared with the workers, continue. Also
    keeps the stream's streak of attempts without a decoded sample (`attempt`, `succeeded`) and raises
    UnreadableDataError when it reaches `limit` (None: no limit)."""

    def __init__(self, counter, kind: str, streak: list[int], limit: int | None, shard_dir: str):
        self.counter, self.kind, self.limit, self.shard_dir = counter, kind, limit, shard_dir
        self.streak = streak  # one-element list shared by a stream's shard and sample handlers

    def __call__(self, exn: Exception) -> bool:
        with self.counter.get_lock():
            self.counter.value += 1
            count = self.counter.value
        if count <= WARN_FIRST or str(count).rstrip("0") == "1":
            log.warning("skipping unreadable latent %s (%d so far): %r", self.kind, count, exn)
        self.attempt()
        return True

    def attempt(self) -> None:
        """One more shard opened or item failed without a sample decoded."""
        self.streak[0] += 1
        if self.limit is not None and self.streak[0] >= self.limit:
            raise UnreadableDataError(
                f"no training sample could be read from {self.shard_dir} in {self.streak[0]} attempts"
            )

    def succeeded(self) -> None:
        self.streak[0] = 0


class LatentShardStream(torch.utils.data.IterableDataset):
    """One rank's stream of ready-made batches; each DataLoader worker builds its own part."""

    def __init__(
        self,
        shard_dir: str,  # dataset directory
        manifest: dict,  # its manifest (shards, counts, shapes)
        batch_size: int,  # samples per batch
        *,
        rank: int,  # data-parallel rank
        world_size: int,  # number of ranks
        seed: int,  # base seed
        epoch: int,  # epoch index (part of every seed)
        resampled: bool,  # random shards forever, or one exact split pass
        batches_per_epoch: int | None,  # the rank's batches per epoch (None: endless)
        shuffle_buffer: int,  # samples buffered per worker for shuffling
        return_keys: bool,  # also yield sample keys
        skipped_shards,  # multiprocessing.Value counting unreadable shards, shared with workers
        skipped_samples,  # the same for unreadable samples
    ):
        super().__init__()
        self.urls = [str(Path(shard_dir) / s["name"]) for s in manifest["shards"]]
        counts = np.array([s["num_samples"] for s in manifest["shards"]], dtype=np.float64)
        self.weights = counts / counts.sum()
        self.num_classes = manifest["num_classes"]
        self.latent_shape = tuple(manifest["latent_shape"])
        self.has_flip = manifest["has_flip"]
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.epoch, self.resampled = seed, epoch, resampled
        self.batches_per_epoch, self.shuffle_buffer, self.return_keys = (
            batches_per_epoch,
            shuffle_buffer,
            return_keys,
        )
        # Only an endless (resampled) stream can spin on unreadable data; an exact pass just ends.
        limit = failure_limit(manifest) if resampled else None
        streak = [0]
        self.shard_handler = _CountingHandler(skipped_shards, "shard", streak, limit, shard_dir)
        self.sample_handler = _CountingHandler(skipped_samples, "sample", streak, limit, shard_dir)

    def _shard_urls(self, rng: np.random.Generator, worker: int, num_workers: int) -> Iterator[dict]:
        if self.resampled:
            while True:
                self.shard_handler.attempt()  # a shard that yields nothing (e.g. all zeros) counts too
                yield {"url": self.urls[rng.choice(len(self.urls), p=self.weights)]}
        # Same permutation on every rank (no rank in its seed), then disjoint slices: each shard once.
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls))
        for index in order[self.rank :: self.world_size][worker::num_workers]:
            yield {"url": self.urls[index]}

    def _decode(self, sample: dict, rng: np.random.Generator) -> tuple:
        use_flip = self.has_flip and rng.random() < 0.5
        mean = load_npy(sample[MEAN_FLIP if use_flip else MEAN]).astype(np.float32)
        std = load_npy(sample[STD_FLIP if use_flip else STD]).astype(np.float32)
        if mean.shape != self.latent_shape or std.shape != self.latent_shape:
            raise ValueError(
                f"{sample['__key__']}: latent shape {mean.shape}, manifest says {self.latent_shape}"
            )
        latent = mean + rng.standard_normal(mean.shape, dtype=np.float32) * std
        onehot = np.zeros(self.num_classes, dtype=np.float32)
        if self.num_classes:
            onehot[int(sample[CLS].decode())] = 1.0
        return latent, onehot, sample["__key__"]

    def _decoded(self, samples: Iterator[dict], rng: np.random.Generator) -> Iterator[tuple]:
        for sample in samples:
            try:
                decoded = self._decode(sample, rng)
            except Exception as exn:  # a bad sample must not end the epoch: count it and go on
                exn.args = (*exn.args, sample.get("__url__"))
                self.sample_handler(exn)
                continue
            self.sample_handler.succeeded()
            yield decoded

    def _batches(self, decoded: Iterator[tuple]) -> Iterator[tuple]:
        while chunk := list(islice(decoded, self.batch_size)):
            if self.resampled and len(chunk) < self.batch_size:
                return
            latents = scale_latents(torch.from_numpy(np.stack([c[0] for c in chunk])))
            onehot = torch.from_numpy(np.stack([c[1] for c in chunk]))
            yield (latents, onehot, [c[2] for c in chunk]) if self.return_keys else (latents, onehot)

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        shuffle_rng = random.Random(int(rng.integers(2**62)))
        urls = self._shard_urls(rng, worker, num_workers)
        samples = wds.tarfile_to_samples(handler=self.shard_handler)(urls)
        # Start yielding once 100 samples are buffered (webdataset's default); the buffer keeps filling.
        initial = min(self.shuffle_buffer, 100)
        shuffled = wds.shuffle(self.shuffle_buffer, initial=initial, rng=shuffle_rng)(samples)
        batches = self._batches(self._decoded(shuffled, rng))
        if self.batches_per_epoch is None:
            return batches
        # with_epoch: this worker's share of the rank's batches, so the DataLoader yields exactly that many.
        share = self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)
        return islice(batches, share)


class LatentLoader:
    """Iterable of (latents [B,4,h,w] scaled, one-hot [B,num_classes]) float32 batches for one rank."""

    def __init__(
        self,
        shard_dir: str,
        batch_size: int,
        *,
        rank: int = 0,  # this process's data-parallel rank (explicit, not read from the environment)
        world_size: int = 1,  # number of data-parallel ranks
        num_workers: int = 2,  # DataLoader worker processes per rank (0: read in this process)
        seed: int = 0,  # base of the (seed, epoch, rank, worker) seeds
        epoch_samples: int | None = None,  # samples per rank per epoch (resampled mode); None: infinite
        resampled: bool = True,  # False: one exact pass, every sample once across ranks and workers
        shuffle_buffer: int = 1000,  # samples held per worker for shuffling (bounds host RAM)
        return_keys: bool = False,  # also yield the list of sample keys (tests, debugging)
        pin_memory: bool = False,  # pin batches for faster host-to-GPU copies
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.shard_dir, self.batch_size = str(shard_dir), batch_size
        self.manifest = read_manifest(shard_dir)
        self.num_classes = self.manifest["num_classes"]
        self.latent_shape = list(self.manifest["latent_shape"])
        self.rank, self.world_size, self.num_workers, self.seed = rank, world_size, num_workers, seed
        self.resampled, self.shuffle_buffer, self.return_keys = resampled, shuffle_buffer, return_keys
        self.pin_memory = pin_memory
        self.batches_per_epoch = None if epoch_samples is None else max(1, epoch_samples // batch_size)
        if self.batches_per_epoch is not None and not resampled:
            raise ValueError("epoch_samples applies to the resampled mode; a non-resampled epoch is one pass")
        if not resampled and len(self.manifest["shards"]) < world_size * max(1, num_workers):
            log.warning("fewer shards than ranks x workers: some workers of an exact pass get no data")
        self._skipped_shards = multiprocessing.Value("q", 0)
        self._skipped_samples = multiprocessing.Value("q", 0)
        self.epoch = 0

    @property
    def skipped_shards(self) -> int:
        """Shards (or their rest, from the first unreadable byte) skipped, over all epochs so far."""
        return self._skipped_shards.value

    @property
    def skipped_samples(self) -> int:
        """Samples of readable shards skipped because they could not be decoded, over all epochs so far."""
        return self._skipped_samples.value

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration uses (it selects the seeds; e.g. when resuming a run)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an infinite (resampled, no epoch_samples) loader has no length")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple]:
        stream = LatentShardStream(
            self.shard_dir,
            self.manifest,
            self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=self.epoch,
            resampled=self.resampled,
            batches_per_epoch=self.batches_per_epoch,
            shuffle_buffer=self.shuffle_buffer,
            return_keys=self.return_keys,
            skipped_shards=self._skipped_shards,
            skipped_samples=self._skipped_samples,
        )
        self.epoch += 1
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory
        )
        return self._one_line_errors(iter(loader))

    def _one_line_errors(self, batches: Iterator[tuple]) -> Iterator[tuple]:
        """A worker's UnreadableDataError comes back wrapped in its traceback text: make it one line."""
        try:
            yield from batches
        except UnreadableDataError:
            raise UnreadableDataError(
                f"no training sample could be read from {self.shard_dir}: {failure_limit(self.manifest)} "
                f"shard openings and failures in a row without one ({self.skipped_shards} unreadable "
                f"shards, {self.skipped_samples} unreadable samples; empty shards are not counted)"
            ) from None


def make_latent_loader(
    shard_dir: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    seed: int = 0,
    epoch_samples: int | None = None,
    **kwargs,
) -> LatentLoader:
    """A `LatentLoader` (see its arguments); kept as the function name the training code calls."""
    return LatentLoader(
        shard_dir,
        batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=seed,
        epoch_samples=epoch_samples,
        **kwargs,
    )
