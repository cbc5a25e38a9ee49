"""encode_dataset.py end to end on CPU: real image files, a tiny real AutoencoderKL, real shards."""

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from helpers_latent import (
    encode_file,
    imagenet_tree,
    random_rgb,
    save_tiny_vae,
    write_edm2_latent_zip,
    write_tree,
)

from encode_dataset import main
from latent.shard_format import entries_to_sample
from latent.vae import load_vae
from preprocess.crop import center_crop_dhariwal
from preprocess.image_decode import decode_image

SYNSETS = ("n01440764", "n01443537", "n02102040")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return imagenet_tree(tmp_path_factory.mktemp("imagenet") / "train", SYNSETS, per_class=4)


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _encode(tree, dest, vae_dir, *extra):
    args = ["--source", tree, "--dest", dest, "--vae", vae_dir, "--resolution", 32, "--batch-size", 4]
    return _run(*args, "--workers", 0, "--shard-size", 5, "--no-progress", *extra)


def _samples(dest):
    manifest = json.loads((Path(dest) / "manifest.json").read_text())
    urls = [{"url": str(Path(dest) / s["name"])} for s in manifest["shards"]]
    return manifest, [entries_to_sample(e) for e in wds.tarfile_samples(urls)]


def _direct_moments(vae, source_file, flip=False):
    image, _, _ = decode_image(Path(source_file).read_bytes())
    pixels = torch.from_numpy(center_crop_dhariwal(image, 32).copy()).permute(2, 0, 1)[None]
    if flip:
        pixels = pixels.flip(-1)
    posterior = vae.encode(pixels.float() / 255).latent_dist
    return posterior.mean[0].numpy(), posterior.std[0].numpy()


def test_imagenet_folder_end_to_end(tree, vae_dir, tmp_path):
    result = _run(
        *["--source", tree, "--dest", tmp_path / "out", "--vae", vae_dir, "--resolution", 32],
        *["--batch-size", 4, "--workers", 2, "--shard-size", 5, "--verify", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    manifest, samples = _samples(tmp_path / "out")
    assert manifest["num_samples"] == len(samples) == 20 and manifest["num_source_files"] == 22
    assert {s["path"].split("_", 1)[1]: s["reason"][:14] for s in manifest["skipped"]} == {
        "bad_text.JPEG": "not an image f",
        "bad_truncated.JPEG": "corrupt or tru",
    }
    assert manifest["num_skipped"] == 2 and manifest["num_upscaled"] == 1  # the 5x3 image
    assert manifest["converted_modes"] == {"CMYK": 1, "L": 1, "P": 1, "RGBA": 1, "I;16": 1}
    assert manifest["classes"] == list(SYNSETS) and manifest["class_counts"] == [4, 12, 4]
    assert manifest["latent_shape"] == [4, 4, 4] and manifest["resolution"] == 32
    assert manifest["vae"]["id"] == str(vae_dir) and manifest["vae"]["revision"].startswith("local-sha256:")
    assert [s["num_samples"] for s in manifest["shards"]] == [5, 4, 4, 5, 2]  # shards 1, 2: a bad file each
    assert manifest["dtype"] == "float32" and not manifest["has_flip"]
    assert len({s.key for s in samples}) == 20
    vae = load_vae(str(vae_dir), "cpu", torch.float32)
    for sample in samples:
        mean, std = _direct_moments(vae, tree / sample.info["source"])
        np.testing.assert_allclose(sample.mean, mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(sample.std, std, rtol=1e-4, atol=1e-5)
        assert sample.label == SYNSETS.index(sample.info["source"].split("/")[0])
        assert sample.mean_flip is None
    log = (tmp_path / "out" / "logs" / "encode-rank0.log").read_text()
    assert "bad_text.JPEG: not an image file" in log and "bad_truncated.JPEG: corrupt" in log


def test_flip_float16_and_limit(tree, vae_dir, tmp_path):
    result = _encode(tree, tmp_path / "out", vae_dir, "--flip", "--storage-dtype", "float16", "--limit", 8)
    assert result.exit_code == 0, result.output
    manifest, samples = _samples(tmp_path / "out")
    assert manifest["num_samples"] + manifest["num_skipped"] == 8 and manifest["has_flip"]
    assert manifest["source"]["limit"] == 8 and manifest["fp16_error"]["std_max_rel"] <= 2**-11
    assert {s.info["source"].split("/")[0] for s in samples} == set(SYNSETS)  # the subset spans classes
    vae = load_vae(str(vae_dir), "cpu", torch.float32)
    for sample in samples:
        mean, std = _direct_moments(vae, tree / sample.info["source"], flip=True)
        np.testing.assert_allclose(sample.mean_flip, mean, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(sample.std_flip, std, rtol=2e-3, atol=1e-4)
        assert not np.allclose(sample.mean_flip, sample.mean, atol=1e-3)
    assert _run("--dest", tmp_path / "out", "--verify").exit_code == 0


def test_edm2_latent_zip_import_without_reencoding(tmp_path):
    labels = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    moments = write_edm2_latent_zip(tmp_path / "img512-sd.zip", labels, latent_size=8)
    result = _run(
        "--source",
        tmp_path / "img512-sd.zip",
        "--dest",
        tmp_path / "out",
        "--vae",
        "not-needed",
        "--shard-size",
        5,
        "--workers",
        0,
        "--verify",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    manifest, samples = _samples(tmp_path / "out")
    assert manifest["num_samples"] == 12 and manifest["num_classes"] == 10
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["resolution"] == 64
    assert (
        manifest["vae"]["id"] == "stabilityai/sd-vae-ft-mse" and manifest["source"]["kind"] == "edm2-latents"
    )
    assert [s.key for s in samples] == [f"img{i:08d}" for i in range(12)]
    for i, sample in enumerate(samples):
        np.testing.assert_array_equal(sample.mean, moments[i, :4])
        np.testing.assert_array_equal(sample.std, moments[i, 4:])
        assert sample.label == labels[i]
    flip = _run("--source", tmp_path / "img512-sd.zip", "--dest", tmp_path / "out2", "--flip")
    assert flip.exit_code == 1 and "--flip needs the images" in flip.output


def test_zipped_folder_with_dataset_json(vae_dir, tmp_path):
    files = {f"00000/img{i:08d}.png": encode_file(random_rgb(36, 40, i), "PNG") for i in range(5)}
    files["dataset.json"] = json.dumps({"labels": [[name, i % 2] for i, name in enumerate(files)]}).encode()
    root = write_tree(tmp_path / "edm2", files)
    with zipfile.ZipFile(tmp_path / "edm2.zip", "w") as zf:
        for name in files:
            zf.write(root / name, name)
    result = _encode(tmp_path / "edm2.zip", tmp_path / "out", vae_dir)
    assert result.exit_code == 0, result.output
    manifest, samples = _samples(tmp_path / "out")
    assert manifest["source"]["label_source"] == "dataset.json" and manifest["class_counts"] == [3, 2]
    assert [(s.key, s.label) for s in samples] == [(f"img{i:08d}", i % 2) for i in range(5)]


def test_verify_reports_a_damaged_shard(tmp_path):
    write_edm2_latent_zip(tmp_path / "img512-sd.zip", [0, 1, 2, 3], latent_size=4)
    assert (
        _run("--source", tmp_path / "img512-sd.zip", "--dest", tmp_path / "out", "--no-progress").exit_code
        == 0
    )
    shard = tmp_path / "out" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = _run("--dest", tmp_path / "out", "--verify")
    assert result.exit_code == 1 and "sha256 differs" in result.output


def test_clear_errors(tree, vae_dir, tmp_path):
    missing = _encode(tmp_path / "nowhere", tmp_path / "out", vae_dir)
    assert missing.exit_code == 2 and "does not exist" in missing.output
    (tmp_path / "empty").mkdir()
    empty = _encode(tmp_path / "empty", tmp_path / "out", vae_dir)
    assert empty.exit_code == 2 and "is empty" in empty.output
    (tmp_path / "a_file").write_text("x")
    unwritable = _encode(tree, tmp_path / "a_file" / "out", vae_dir)
    assert unwritable.exit_code == 1 and "is not writable" in unwritable.output
    bf16 = _encode(tree, tmp_path / "out", vae_dir, "--dtype", "bfloat16", "--device", "cpu")
    assert bf16.exit_code == 1 and "on CPU the VAE runs in float32" in bf16.output
    no_source = _run("--dest", tmp_path / "out")
    assert no_source.exit_code == 2 and "--source is required" in no_source.output
    not_done = _run("--dest", tmp_path / "empty", "--verify")
    assert not_done.exit_code == 1 and "not a finished latent dataset" in not_done.output
    bad_vae = _encode(tree, tmp_path / "out_vae", tmp_path / "no_such_vae")
    assert bad_vae.exit_code == 1 and "is neither a local folder nor a Hugging Face hub id" in bad_vae.output
    not_a_vae = _encode(tree, tmp_path / "out_vae", tmp_path / "empty")
    assert not_a_vae.exit_code == 1 and "is not a diffusers AutoencoderKL folder" in not_a_vae.output
    dest_is_file = _encode(tree, tmp_path / "a_file", vae_dir)
    assert (
        dest_is_file.exit_code == 1
        and f"destination {tmp_path / 'a_file'} is not writable" in dest_is_file.output
    )
    bogus = _encode(tree, tmp_path / "out", vae_dir, "--device", "bogus")
    assert bogus.exit_code == 2 and "Invalid value for '--device': 'bogus' is not a device" in bogus.output


def test_rerun_with_other_options_is_refused(tmp_path):
    write_edm2_latent_zip(tmp_path / "img512-sd.zip", [0, 1, 2], latent_size=4)
    args = ["--source", tmp_path / "img512-sd.zip", "--dest", tmp_path / "out", "--no-progress"]
    assert _run(*args, "--shard-size", 2).exit_code == 0
    assert _run(*args, "--shard-size", 2).exit_code == 0  # same job: nothing left to do, manifest again
    other = _run(*args, "--shard-size", 3)
    assert other.exit_code == 1 and "holds another encoding job (shard_size: 2 -> 3)" in other.output


def _add_tar_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_any_file_name_gives_a_valid_unique_key(vae_dir, tmp_path):
    images = [encode_file(random_rgb(40, 40, seed), "PNG") for seed in range(8)]
    names = ["_lead.png", "__.png", "/abs/x/a.png", "/abs/y/a.png", "b.c.png", "b_c.png", "b-c-2.png"]
    with tarfile.open(tmp_path / "odd.tar", "w") as tar:
        for name, data in zip(names, images, strict=False):
            _add_tar_member(tar, name, data)
        _add_tar_member(tar, "_lead.png", images[7])  # a second member of that name replaces the first
    result = _encode(tmp_path / "odd.tar", tmp_path / "out", vae_dir, "--verify")
    assert result.exit_code == 0, result.output
    manifest, samples = _samples(tmp_path / "out")
    keys = sorted(s.key for s in samples)
    assert len(keys) == len(set(keys)) == manifest["num_samples"] == len(names)
    assert all(not k.startswith("_") and "." not in k for k in keys), keys
    assert manifest["skipped"] == [
        {"path": "_lead.png", "reason": "a later member of the same name replaces it"}
    ]
    lead = next(s for s in samples if s.info["source"] == "_lead.png")
    vae = load_vae(str(vae_dir))
    pixels = center_crop_dhariwal(decode_image(images[7])[0], 32)
    expected = vae.encode(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255)
    np.testing.assert_allclose(lead.mean, expected.latent_dist.mean[0].numpy(), atol=1e-5)


def test_resolution_the_vae_cannot_represent_is_refused(tree, vae_dir, tmp_path):
    result = _encode(tree, tmp_path / "out", vae_dir, "--resolution", 100)
    assert result.exit_code == 1, result.output
    assert "--resolution 100 is not a multiple of 8" in result.output and "use 96 or 104" in result.output
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert _encode(tree, tmp_path / "ok", vae_dir, "--resolution", 40, "--limit", 2).exit_code == 0


def test_rerun_with_changed_vae_weights_is_refused(tree, tmp_path):
    vae_dir = save_tiny_vae(tmp_path / "vae", seed=0)
    assert _encode(tree, tmp_path / "out", vae_dir, "--limit", 6).exit_code == 0
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    save_tiny_vae(vae_dir, seed=1)  # other weights at the same path
    rerun = _encode(tree, tmp_path / "out", vae_dir, "--limit", 6)
    assert rerun.exit_code == 1
    assert "was encoded with other weights of the VAE" in rerun.output and "local-sha256:" in rerun.output
    assert (tmp_path / "out" / "manifest.json").read_text() == manifest
def test_shard_writer_thread_writes_what_it_was_given_and_reports_errors(tmp_path):
    from latent.encode_job import _ShardAccumulator, _ShardWriter
    from latent.encode_plan import PARTS, record_path
    from latent.shard_format import LatentSample
    from latent.shards import shard_name

    (tmp_path / PARTS).mkdir()
    acc = _ShardAccumulator(1)
    acc.samples.append(LatentSample("a", np.zeros((4, 2, 2), np.float32), np.ones((4, 2, 2), np.float32)))
    writer = _ShardWriter(tmp_path, "float32")
    writer.submit(3, acc)
    writer.close()  # waits for the queued shard: nothing handed over is lost
    assert (tmp_path / shard_name(3)).is_file()
    assert json.loads(record_path(tmp_path, 3).read_text())["num_samples"] == 1

    broken = _ShardWriter(tmp_path / "missing-folder", "float32")
    broken.submit(0, acc)
    with pytest.raises(FileNotFoundError):
        broken.close()


def test_default_workers_share_the_cores_among_local_ranks(monkeypatch):
    from latent.encode_job import default_workers

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers() == max(1, min(16, cores - 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))
    assert default_workers() == 1
