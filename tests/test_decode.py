"""decode_samples.py end to end on the CPU: tiny network export + tiny AutoencoderKL (random weights).

PNG / npz / grid outputs hold the same pixels, those pixels follow EDM2's decode convention, reruns make
only missing images, images do not depend on batch size or process count, metrics run from the CLI.

Run: .venv/bin/python -m pytest tests/test_decode.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from helpers_metrics import ref_command_args, save_standin_inception
from helpers_sampling import tiny_net, tiny_vae

from decode_samples import main
from latent.scaling import unscale_latents
from latent.vae import load_vae
from sida_edm2.io.network_files import load_network, save_export
from sida_edm2.sample.generate_images import resolve_network_path
from sida_edm2.sample.metrics import main as metrics_main
from sida_edm2.sample.sample_files import png_path, read_png
from sida_edm2.sample.sampling import generate_latents, teacher_latents

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    save_export(tiny_net(seed=0), root / "run" / "export-0000100.safetensors")
    tiny_vae().save_pretrained(root / "vae")
    return root


def _decode(assets, outdir, *args) -> str:
    result = CliRunner().invoke(
        main,
        ["--generator", str(assets / "run"), "--vae", str(assets / "vae"), "--outdir", str(outdir), *args],
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def _pngs(outdir, seeds) -> np.ndarray:
    return np.stack([read_png(png_path(outdir, s))[0] for s in seeds])


def assert_same_images(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float32 rounding between batch shapes: a value that lands next to an integer before
    truncation may move one level (seen in ~1 of 25k values); the latents themselves match to 1e-5."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_png_npz_grid_hold_the_same_pixels_in_edm2_convention(assets, tmp_path):
    out = tmp_path / "out"
    _decode(
        assets,
        out,
        "--seeds",
        "0-9",
        "--batch",
        "4",
        "--format",
        "png,npz",
        "--format",
        "grid",
        "--grid-images",
        "6",
    )
    assert png_path(out, 7) == out / "000000" / "000007.png" and png_path(out, 7).is_file()
    pngs = _pngs(out, range(10))
    assert pngs.shape == (10, 32, 32, 3) and pngs.dtype == np.uint8
    with np.load(out / "images.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0"], pngs)
        labels = npz["labels"]
    assert labels.tolist() == [read_png(png_path(out, s))[1] for s in range(10)]
    grid = np.asarray(PIL.Image.open(out / "grid.png"))
    assert grid.shape == (64, 96, 3)  # 6 images: 3 columns x 2 rows
    tiles = grid.reshape(2, 32, 3, 32, 3).transpose(0, 2, 1, 3, 4).reshape(6, 32, 32, 3)
    np.testing.assert_array_equal(tiles, pngs[:6])

    # The same pixels by hand: G(2.5 z) -> unscale -> VAE decode -> clamp(0,1)*255 truncated to uint8
    # (in the CLI's batches of 4, so that float rounding is identical).
    net = load_network(assets / "run" / "export-0000100.safetensors")
    vae = load_vae(str(assets / "vae"))
    decoded, drawn = [], []
    for chunk in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9]):
        latents, chunk_labels = generate_latents(net, chunk)
        with torch.no_grad():
            decoded.append(vae.decode(unscale_latents(latents)).sample.clamp(0, 1) * 255)
        drawn += chunk_labels.tolist()
    assert drawn == labels.tolist()
    decoded = torch.cat(decoded)
    truncated = decoded.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(pngs, truncated)
    rounded = decoded.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert (rounded != pngs).mean() > 0.1  # truncation, not rounding, is what the files hold


def test_rerun_makes_only_missing_images_whatever_the_batch(assets, tmp_path):
    out = tmp_path / "out"
    _decode(assets, out, "--seeds", "0-5", "--batch", "4")
    before = {s: png_path(out, s).stat().st_mtime_ns for s in range(6)}
    original = _pngs(out, [3])
    os.remove(png_path(out, 3))
    output = _decode(assets, out, "--seeds", "0-7", "--batch", "3")
    assert "made 3 images" in output  # seed 3 again, plus 6 and 7
    assert all(png_path(out, s).stat().st_mtime_ns == before[s] for s in (0, 1, 2, 4, 5))
    assert_same_images(_pngs(out, [3]), original)
    single = tmp_path / "single"
    _decode(assets, single, "--seeds", "0-7", "--batch", "1")
    assert_same_images(_pngs(single, range(8)), _pngs(out, range(8)))


def test_classes_and_npz_only(assets, tmp_path):
    out = tmp_path / "one"
    _decode(assets, out, "--seeds", "0-3", "--classes", "7", "--format", "npz")
    with np.load(out / "images.npz") as npz:
        assert npz["labels"].tolist() == [7, 7, 7, 7] and npz["arr_0"].shape == (4, 32, 32, 3)
    assert not any(out.rglob("*.png"))  # the PNG tree was only staging for the npz
    cycled = tmp_path / "cycled"
    _decode(assets, cycled, "--seeds", "10-14", "--classes", "1,2")
    assert [read_png(png_path(cycled, s))[1] for s in range(10, 15)] == [1, 2, 1, 2, 1]
    bad = CliRunner().invoke(
        main, ["--generator", str(assets / "run"), "--outdir", str(tmp_path / "x"), "--format", "jpeg"]
    )
    assert bad.exit_code != 0 and "jpeg" in bad.output


def test_teacher_heun_path(assets, tmp_path):
    teacher = tiny_net(seed=3)
    save_export(teacher, tmp_path / "teacher.safetensors")
    out = tmp_path / "teacher-out"
    result = CliRunner().invoke(
        main,
        [
            "--generator",
            str(tmp_path / "teacher.safetensors"),
            "--teacher-steps",
            "2",
            "--vae",
            str(assets / "vae"),
            "--outdir",
            str(out),
            "--seeds",
            "0-1",
        ],
    )
    assert result.exit_code == 0, result.output
    latents, _ = teacher_latents(load_network(tmp_path / "teacher.safetensors"), [0, 1], num_steps=2)
    with torch.no_grad():
        from latent.vae import decode_to_uint8

        expected = decode_to_uint8(load_vae(str(assets / "vae")), latents).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(_pngs(out, [0, 1]), expected)


def test_network_path_resolution(tmp_path):
    run = tmp_path / "run"
    (run / "exports").mkdir(parents=True)
    for name in (
        "export-0000050.safetensors",
        "export-0000100.safetensors",
        "exports/network-0000075.safetensors",
    ):
        (run / name).touch()
    assert resolve_network_path(run).name == "export-0000100.safetensors"
    for name in ("export-0000050.safetensors", "export-0000100.safetensors"):
        (run / name).unlink()
    assert resolve_network_path(run).name == "network-0000075.safetensors"
    (run / "export-latest.safetensors").touch()
    assert resolve_network_path(run).name == "export-latest.safetensors"
    assert resolve_network_path(run / "exports/network-0000075.safetensors").parent.name == "exports"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        resolve_network_path(tmp_path / "empty")


def test_metrics_from_the_cli(assets, tmp_path):
    out = tmp_path / "out"
    _decode(assets, out, "--seeds", "0-11")
    inception = save_standin_inception(tmp_path / "inception.pt")
    ref = tmp_path / "ref.pkl"
    result = CliRunner().invoke(metrics_main, ref_command_args(out, ref, inception))
    assert result.exit_code == 0, result.output
    output = _decode(
        assets,
        out,
        "--seeds",
        "0-11",
        "--metrics",
        "fid",
        "--ref",
        str(ref),
        "--inception",
        inception,
        "--workers",
        "0",
    )
    assert "made 0 images" in output
    record = json.loads((out / "metrics.json").read_text())
    assert abs(record["fid"]) < 1e-3 and record["num_images"] == 12
    missing = CliRunner().invoke(
        main,
        [
            "--generator",
            str(assets / "run"),
            "--outdir",
            str(out),
            "--seeds",
            "0-1",
            "--metrics",
            "fid",
            "--ref",
            str(ref),
            "--inception",
            str(tmp_path / "no.pt"),
        ],
    )
    assert missing.exit_code == 1 and "Error: FID needs the Inception-v3 TorchScript file" in missing.output
    assert "inception-2015-12-05.pt" in missing.output and isinstance(missing.exception, SystemExit)


@pytest.mark.slow
def test_two_processes_write_the_same_images(assets, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out2 = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "decode_samples.py"),
        "--generator",
        str(assets / "run"),
        "--vae",
        str(assets / "vae"),
        "--outdir",
        str(out2),
        "--seeds",
        "0-6",
        "--batch",
        "2",
        "--format",
        "png,npz",
    ]
    _decode(assets, out2, "--seeds", "0-2")  # an earlier, partial run: 3-6 are left
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The ranks split the missing seeds, not the seed list: 2 each.
    assert "rank 0: made 2 images" in proc.stdout and "rank 1: made 2 images" in proc.stdout
    out1 = tmp_path / "one"
    _decode(assets, out1, "--seeds", "0-6", "--batch", "3")
    assert_same_images(_pngs(out2, range(7)), _pngs(out1, range(7)))
    with np.load(out2 / "images.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0"], _pngs(out2, range(7)))


@pytest.mark.slow
def test_png_encoder_processes_write_what_threads_write(tmp_path):
    from sida_edm2.sample.sample_files import PngWriter

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    for name, options in (("threads", {"num_threads": 2}), ("processes", {"processes": 2})):
        with PngWriter(tmp_path / name, **options) as writer:
            writer.submit(images, [5, 1005, 7], [1, 2, -1])
    for seed, image, label in zip([5, 1005, 7], images, [1, 2, -1], strict=True):
        for name in ("threads", "processes"):
            pixels, stored = read_png(png_path(tmp_path / name, seed))
            assert np.array_equal(pixels, image) and stored == label
