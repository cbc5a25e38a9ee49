"""The training reader: EDM2 scaling, fresh noise, one-hot labels, flips, rank x worker splitting,
deterministic seeds, epochs, and skipping (with a count) what cannot be read."""

import threading

import numpy as np
import pytest
import torch

from latent.reader import UnreadableDataError, make_latent_loader
from latent.shard_format import LatentSample
from latent.shards import write_latent_shards, write_synthetic_dataset

RAW_MEAN = np.array([5.81, 3.25, 0.12, -2.15]).reshape(4, 1, 1)
RAW_STD = np.array([4.17, 4.62, 3.71, 3.28]).reshape(4, 1, 1)
N, SHAPE = 50, (4, 4, 4)


def _dataset(path, std_value=0.0, num_classes=7, seed=0):
    rng = np.random.default_rng(seed)
    mean = rng.normal(2.0, 4.0, size=(N, *SHAPE)).astype(np.float32)
    std = np.full_like(mean, std_value)
    labels = np.arange(N) % num_classes if num_classes else np.full(N, -1)
    write_synthetic_dataset(path, mean, std, labels, num_classes=num_classes, shard_size=6)
    return {f"synthetic{i:08d}": (mean[i], labels[i]) for i in range(N)}


def _read_all(loader):
    return [(x, c, k) for x, c, keys in loader for k, x, c in zip(keys, x, c, strict=True)]


def test_scaling_and_one_hot(tmp_path):
    truth = _dataset(tmp_path)
    loader = make_latent_loader(tmp_path, 8, num_workers=0, resampled=False, return_keys=True)
    rows = _read_all(loader)
    assert len(rows) == N
    for x, onehot, key in rows:
        mean, label = truth[key]
        assert x.dtype == torch.float32 and onehot.shape == (7,)
        np.testing.assert_allclose(x.numpy(), (mean - RAW_MEAN) / RAW_STD * 0.5, rtol=1e-5, atol=1e-6)
        assert onehot.sum() == 1 and onehot[label] == 1


def test_fresh_noise_every_read(tmp_path):
    truth = _dataset(tmp_path, std_value=0.3)
    loader = make_latent_loader(tmp_path, 10, num_workers=0, resampled=False, return_keys=True)
    first, second = (dict((k, x) for x, _, k in _read_all(loader)) for _ in range(2))
    noise = [
        ((first[k].numpy() - (truth[k][0] - RAW_MEAN) / RAW_STD * 0.5) / (0.3 * 0.5 / RAW_STD)) for k in truth
    ]
    noise = np.stack(noise)
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05  # randn * std, then scaled
    assert all(not torch.equal(first[k], second[k]) for k in truth)  # epoch 2 draws anew


def test_flip_is_chosen_at_random_when_stored(tmp_path):
    zeros = np.zeros(SHAPE, np.float32)
    samples = [LatentSample(f"s{i}", zeros, zeros, 0, zeros + 10, zeros) for i in range(40)]
    write_latent_shards(tmp_path, samples, num_classes=1, shard_size=10)
    loader = make_latent_loader(tmp_path, 40, num_workers=0, resampled=False)
    ((x, _),) = list(loader)
    flipped = (x[:, 0, 0, 0] > (10 - 5.81) / 4.17 * 0.5 - 1e-4).numpy()
    assert 8 < flipped.sum() < 32


def test_unlabelled_dataset_gives_empty_one_hot(tmp_path):
    _dataset(tmp_path, num_classes=0)
    x, onehot = next(iter(make_latent_loader(tmp_path, 4, num_workers=0, shuffle_buffer=8)))
    assert x.shape == (4, *SHAPE) and onehot.shape == (4, 0)


def test_two_ranks_two_workers_read_each_sample_once(tmp_path):
    truth = _dataset(tmp_path)  # 9 shards
    keys = []
    for rank in range(2):
        loader = make_latent_loader(
            tmp_path, 4, rank=rank, world_size=2, num_workers=2, resampled=False, return_keys=True, seed=3
        )
        keys += [k for _, _, batch_keys in loader for k in batch_keys]
    assert sorted(keys) == sorted(truth)


def test_resampled_stream_is_deterministic_per_rank(tmp_path):
    _dataset(tmp_path, std_value=0.5)

    def first_batches(rank, seed):
        loader = make_latent_loader(
            tmp_path,
            4,
            rank=rank,
            world_size=2,
            num_workers=2,
            seed=seed,
            epoch_samples=16,
            shuffle_buffer=20,
        )
        return [x for x, _ in loader]

    a, b = first_batches(0, 1), first_batches(0, 1)
    assert len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], first_batches(1, 1)[0])
    assert not torch.equal(a[0], first_batches(0, 2)[0])


def test_epochs_have_the_requested_length_and_differ(tmp_path):
    _dataset(tmp_path, std_value=0.5)
    loader = make_latent_loader(tmp_path, 4, num_workers=2, epoch_samples=20, shuffle_buffer=20)
    assert len(loader) == 5
    epoch0, epoch1 = [x for x, _ in loader], [x for x, _ in loader]
    assert len(epoch0) == len(epoch1) == 5
    assert not torch.equal(epoch0[0], epoch1[0])


def test_unreadable_shards_and_samples_are_skipped_and_counted(tmp_path):
    truth = _dataset(tmp_path)
    shards = sorted(tmp_path.glob("shard-*.tar"))
    shards[0].write_bytes(shards[0].read_bytes()[:4000])  # a truncated tar: its tail is lost
    data = bytearray(shards[1].read_bytes())
    start = data.index(b"\x93NUMPY")  # break the first .npy header of the second shard
    data[start : start + 6] = b"garbag"
    shards[1].write_bytes(bytes(data))
    loader = make_latent_loader(tmp_path, 4, num_workers=2, resampled=False, return_keys=True)
    keys = [k for _, _, batch_keys in loader for k in batch_keys]
    assert len(keys) == len(set(keys)) and set(keys) < set(truth)
    assert len(keys) >= N - 6 - 1  # at most the truncated shard and one sample are lost
    assert loader.skipped_shards >= 1 and loader.skipped_samples >= 1


def _first_batch_or_error(loader, seconds: float = 60):
    """next(iter(loader)) in a thread: the batch or the exception, or AssertionError if it never ends."""
    result = []

    def read():
        try:
            result.append(next(iter(loader)))
        except Exception as err:  # handed to the test thread
            result.append(err)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"the reader was still trying after {seconds} s"
    return result[0]


def _break_every_npy(path):
    data = bytearray(path.read_bytes())
    start = data.find(b"\x93NUMPY")
    while start >= 0:
        data[start : start + 6] = b"garbag"
        start = data.find(b"\x93NUMPY", start)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["random-bytes", "zeros", "bad-samples"])
@pytest.mark.parametrize("workers", [0, 2])
def test_no_readable_sample_stops_with_one_error_naming_the_folder(tmp_path, damage, workers):
    _dataset(tmp_path)
    for shard in sorted(tmp_path.glob("shard-*.tar")):
        if damage == "random-bytes":
            shard.write_bytes(np.random.default_rng(0).bytes(shard.stat().st_size))
        elif damage == "zeros":  # tar reads zero blocks as the end of the archive: no error, no sample
            shard.write_bytes(bytes(shard.stat().st_size))
        else:
            _break_every_npy(shard)
    loader = make_latent_loader(tmp_path, 4, num_workers=workers, seed=1)
    error = _first_batch_or_error(loader)
    assert isinstance(error, UnreadableDataError), error
    message = str(error)
    assert f"no training sample could be read from {tmp_path}" in message and "\n" not in message
    counted = {"random-bytes": (True, False), "zeros": (False, False), "bad-samples": (False, True)}
    assert (loader.skipped_shards > 0, loader.skipped_samples > 0) == counted[damage]


def test_mostly_unreadable_data_still_reads(tmp_path):
    """All but one shard broken: the stream keeps reading the readable one and never gives up."""
    _dataset(tmp_path)
    shards = sorted(tmp_path.glob("shard-*.tar"))
    for shard in shards[1:]:
        shard.write_bytes(b"not a tar")
    loader = make_latent_loader(tmp_path, 4, num_workers=0, seed=1, epoch_samples=200)
    assert sum(x.shape[0] for x, _ in loader) == 200 and loader.skipped_shards > 0


def test_argument_errors(tmp_path):
    _dataset(tmp_path)
    with pytest.raises(ValueError, match="rank 2"):
        make_latent_loader(tmp_path, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="epoch_samples"):
        make_latent_loader(tmp_path, 4, resampled=False, epoch_samples=10)
    with pytest.raises(TypeError, match="infinite"):
        len(make_latent_loader(tmp_path, 4))
