"""EDM2 scaling constants, the shard writer, manifest fields, float16 error and --verify's checks."""

import json
import tarfile

import numpy as np
import pytest
import torch

from latent.manifest import read_manifest
from latent.scaling import scale_latents, scaling_constants, unscale_latents
from latent.shard_format import LatentSample, entries_to_sample, sample_to_entries
from latent.shards import write_latent_shards, write_synthetic_dataset
from latent.verify import verify_dataset


def _moments(n, seed=0, shape=(4, 4, 4)):
    rng = np.random.default_rng(seed)
    mean = rng.normal(3.0, 5.0, size=(n, *shape)).astype(np.float32)
    std = np.exp(rng.normal(-3.0, 1.0, size=(n, *shape))).astype(np.float32)
    return mean, std


def test_scaling_matches_design_constants():
    raw = torch.randn(2, 4, 3, 3, dtype=torch.float64) * 4
    mean = torch.tensor([5.81, 3.25, 0.12, -2.15], dtype=torch.float64).view(4, 1, 1)
    std = torch.tensor([4.17, 4.62, 3.71, 3.28], dtype=torch.float64).view(4, 1, 1)
    torch.testing.assert_close(scale_latents(raw), (raw - mean) / std * 0.5)
    torch.testing.assert_close(unscale_latents(scale_latents(raw)), raw)
    assert scale_latents(raw.float()).dtype == torch.float32
    assert scaling_constants()["final_std"] == 0.5


def test_sample_entries_round_trip():
    mean, std = _moments(1)
    sample = LatentSample("k1", mean[0], std[0], 5, mean[0] + 1, std[0] * 2, {"source": "a/b.png"})
    back = entries_to_sample(sample_to_entries(sample))
    np.testing.assert_array_equal(back.mean, mean[0])
    np.testing.assert_array_equal(back.std_flip, std[0] * 2)
    assert (back.key, back.label, back.info) == ("k1", 5, {"source": "a/b.png"})
    with pytest.raises(ValueError, match="invalid sample key"):
        sample_to_entries(LatentSample("a.b", mean[0], std[0]))


def test_synthetic_dataset_manifest_and_shards(tmp_path):
    mean, std = _moments(23)
    labels = np.arange(23) % 5
    write_synthetic_dataset(tmp_path, mean, std, labels, num_classes=5, shard_size=10)
    manifest = read_manifest(tmp_path)
    assert manifest["num_samples"] == 23 and manifest["num_classes"] == 5
    assert manifest["class_counts"] == [5, 5, 5, 4, 4]
    assert manifest["latent_shape"] == [4, 4, 4] and manifest["dtype"] == "float32"
    assert [s["num_samples"] for s in manifest["shards"]] == [10, 10, 3]
    assert manifest["scaling"] == scaling_constants() and manifest["tool_version"]
    with tarfile.open(tmp_path / manifest["shards"][1]["name"]) as tf:
        names = tf.getnames()
    first = sorted(n.split(".", 1)[1] for n in names if n.startswith("synthetic00000010."))
    assert first == ["cls", "json", "mean.npy", "std.npy"] and len(names) == 4 * 10
    assert verify_dataset(tmp_path) == []


def test_float16_storage_error_is_measured(tmp_path):
    mean, std = _moments(8, seed=1)
    samples = [LatentSample(f"s{i}", mean[i], std[i], 0) for i in range(8)]
    manifest = write_latent_shards(tmp_path, samples, num_classes=1, storage_dtype="float16", shard_size=4)
    error = manifest["fp16_error"]
    true_mean_err = np.abs(mean.astype(np.float16).astype(np.float64) - mean).max()
    assert error["mean_max_abs"] == pytest.approx(true_mean_err)
    assert 0 < error["std_max_rel"] <= 2**-11  # round to nearest: half an ulp of a 10-bit mantissa
    assert error["mean_max_abs_scaled"] < error["mean_max_abs"]  # scaling shrinks it by 0.5/raw_std
    assert verify_dataset(tmp_path) == []


def test_verify_finds_damage(tmp_path):
    mean, std = _moments(12)
    write_synthetic_dataset(tmp_path, mean, std, np.zeros(12, int), num_classes=2, shard_size=6)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    shard = tmp_path / manifest["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:5000])  # truncate the first shard
    manifest["class_counts"] = [11, 1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_dataset(tmp_path)
    assert any("sha256" in p for p in problems)
    assert any("manifest says 6" in p for p in problems)
    assert any("class counts" in p for p in problems)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished latent dataset"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"num_samples": 3}))
    with pytest.raises(ValueError, match="lacks the fields"):
        read_manifest(tmp_path)
