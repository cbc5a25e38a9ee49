"""Metrics: Fréchet distance against closed forms, float64 streaming statistics (1 vs 2 processes),
reference statistics files, image sources, and FID / FD_DINOv2 end to end with stand-in detectors.

Run: .venv/bin/python -m pytest tests/test_metrics.py
"""

import math
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from helpers_metrics import (
    StandInBackbone,
    ref_command_args,
    save_standin_inception,
    standin_detectors,
    stats_worker,
)
from helpers_sampling import tiny_vae

from latent.shards import write_synthetic_dataset
from sida_edm2.io.safe_unpickle import UnsafePickleError
from sida_edm2.sample import detectors as det
from sida_edm2.sample.image_sources import image_batches, npz_image_count
from sida_edm2.sample.metrics import (
    FeatureStats,
    accumulate_stats,
    compare_to_reference,
    frechet_distance,
    load_reference_stats,
    main,
    save_reference_stats,
)


def _random_spd(dim: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


def test_frechet_distance_of_identical_gaussians_is_zero():
    sigma = _random_spd(16, 0)
    mu = np.random.default_rng(1).normal(size=16)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_diagonal_and_rotated():
    mu1, mu2 = np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 1.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    # |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2 = 9 + 6
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(15.0, abs=1e-10)
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(3, 3)))  # commuting, non-diagonal covariances
    assert frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T) == pytest.approx(
        15.0
    )


def test_frechet_distance_general_2x2_closed_form():
    """For 2x2 M = S1 S2 (positive eigenvalues): tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))."""
    s1, s2 = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[0.5, -0.2], [-0.2, 3.0]])
    mu1, mu2 = np.array([0.5, -1.0]), np.array([1.5, 0.0])
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    expected = 2.0 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_feature_stats_match_numpy_in_chunks():
    x = np.random.default_rng(3).normal(size=(101, 6)) * 3 + 5
    stats = FeatureStats(6)
    for chunk in np.array_split(x, 7):
        stats.update(torch.from_numpy(chunk).float())
    mu, sigma = stats.mean_cov()
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x32, rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.count == 101 and stats.sum.dtype == torch.float64


def _write_images(folder, count: int, seed: int, contrast: float = 1.0, size: int = 32) -> np.ndarray:
    """count RGB PNGs (smooth random patterns, so features vary) -> the uint8 array [N,H,W,3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for i in range(count):
        f = rng.uniform(1, 4, size=3)
        phase = rng.uniform(0, 6.3, size=3)
        img = np.stack([np.sin(f[c] * 6.3 * (xx + yy * c / 2) + phase[c]) for c in range(3)], axis=-1)
        img = ((img * 0.5 * contrast + 0.5) * 255).astype(np.uint8)
        images.append(img)
        folder.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(img).save(folder / f"{i:06d}.png")
    return np.stack(images)


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    array = _write_images(root / "a", 24, seed=0)
    np.savez(root / "a.npz", arr_0=array)
    other = _write_images(root / "b", 24, seed=1, contrast=0.3)  # another distribution
    inception = save_standin_inception(root / det.INCEPTION_FILE)
    return root, array, other, inception


def test_image_sources_agree_and_split_by_rank(image_set):
    root, array, _, _ = image_set
    from_dir = torch.cat(list(image_batches(root / "a", batch_size=5, num_workers=0)))
    from_npz = torch.cat(list(image_batches(root / "a.npz", batch_size=5)))
    expected = torch.from_numpy(array).permute(0, 3, 1, 2)
    assert torch.equal(from_dir, expected) and torch.equal(from_npz, expected)
    assert npz_image_count(root / "a.npz") == 24
    shares = [torch.cat(list(image_batches(root / "a.npz", 4, rank=r, world_size=3))) for r in range(3)]
    assert torch.equal(torch.cat(shares), expected)
    capped = torch.cat(list(image_batches(root / "a.npz", 4, rank=1, world_size=2, max_images=10)))
    assert torch.equal(capped, expected[5:10])
    mixed = [root / "a" / "000000.png", root / "a" / "000001.png"]
    PIL.Image.new("RGB", (64, 64)).save(root / "grid-like.png")
    with pytest.raises(ValueError, match="different sizes"):
        list(image_batches([*mixed, root / "grid-like.png"], batch_size=4, num_workers=0))


def test_latent_shards_are_decoded_once_across_ranks(image_set, tmp_path):
    rng = np.random.default_rng(4)
    mean = rng.normal(size=(7, 4, 8, 8)).astype(np.float32) * 4
    write_synthetic_dataset(
        tmp_path / "shards", mean, np.full_like(mean, 1e-3), np.arange(7) % 3, 3, shard_size=3
    )
    vae = tiny_vae()
    shares = [
        list(image_batches(tmp_path / "shards", 2, rank=r, world_size=2, num_workers=0, vae=vae))
        for r in (0, 1)
    ]
    images = torch.cat([b for share in shares for b in share])
    assert images.shape == (7, 3, 16, 16) and images.dtype == torch.uint8
    capped = list(image_batches(tmp_path / "shards", 2, num_workers=0, vae=vae, max_images=5))
    assert sum(len(b) for b in capped) == 5
    vae.save_pretrained(tmp_path / "vae")
    _, _, _, inception = image_set
    vae_args = ("--vae", str(tmp_path / "vae"))
    args = ref_command_args(tmp_path / "shards", tmp_path / "ref.pkl", inception, *vae_args)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "fid: 7 images" in result.output


def test_detectors_end_to_end_with_standins(image_set):
    root, array, _, inception = image_set
    detectors = standin_detectors(inception)
    stats = accumulate_stats(detectors, image_batches(root / "a", batch_size=7, num_workers=0))
    # The same statistics computed directly from all features at once (float32 features differ by
    # rounding between batch shapes).
    images = torch.from_numpy(array).permute(0, 3, 1, 2)
    for name, detector in detectors.items():
        features = detector(images).double().numpy()
        mu, sigma = stats[name].mean_cov()
        np.testing.assert_allclose(mu, features.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-4, atol=1e-8)
    ref_path = save_reference_stats(root / "ref-a.pkl", stats)
    same = compare_to_reference(stats, load_reference_stats(ref_path))
    assert all(abs(v) < 1e-6 for v in same.values())
    other_stats = accumulate_stats(detectors, image_batches(root / "b", batch_size=7, num_workers=0))
    different = compare_to_reference(other_stats, load_reference_stats(ref_path))
    assert all(v > 1e-3 for v in different.values())


def test_dinov2_preprocessing_matches_edm2():
    detector = det.DinoV2Detector(StandInBackbone())
    white = torch.full([2, 3, 64, 48], 255, dtype=torch.uint8)
    x = detector.preprocess(white)
    assert x.shape == (2, 3, 224, 224)
    expected = (1 - torch.tensor(det.IMAGENET_MEAN)) / torch.tensor(det.IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 100, 100], expected)
    img = torch.randint(0, 256, [1, 3, 448, 448], dtype=torch.uint8)
    manual = torch.nn.functional.interpolate(
        img.float() / 255, size=(224, 224), mode="bicubic", antialias=True
    )
    mean, std = torch.tensor(det.IMAGENET_MEAN)[:, None, None], torch.tensor(det.IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(detector.preprocess(img), (manual - mean) / std)


def test_metrics_cli_ref_and_calc(image_set, tmp_path):
    root, _, _, inception = image_set
    runner = CliRunner()
    ref = tmp_path / "ref.pkl"
    args = ["--metrics", "fid", "--inception", inception, "--batch", "5", "--workers", "0"]
    result = runner.invoke(main, ["ref", "--source", str(root / "a"), "--dest", str(ref), *args])
    assert result.exit_code == 0, result.output
    stored = load_reference_stats(ref)
    assert (
        set(stored) == {"fid"}
        and stored["fid"]["mu"].shape == (16,)
        and stored["fid"]["sigma"].dtype == np.float64
    )
    same = runner.invoke(main, ["calc", "--source", str(root / "a.npz"), "--ref", str(ref), *args])
    assert same.exit_code == 0, same.output
    assert abs(float(same.output.split("fid:")[1].split()[0])) < 1e-3
    different = runner.invoke(main, ["calc", "--source", str(root / "b"), "--ref", str(ref), *args])
    assert float(different.output.split("fid:")[1].split()[0]) > 1e-3
    missing = runner.invoke(
        main, ["calc", "--source", str(root / "b"), "--ref", str(ref), "--metrics", "fd_dinov2"]
    )
    assert missing.exit_code != 0 and "no statistics for fd_dinov2" in missing.output


def test_reference_stats_loader_accepts_numpy_pickles_only(tmp_path):
    data = {"fid": {"mu": np.arange(3.0), "sigma": np.eye(3)}}
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        loaded = load_reference_stats(path)
        np.testing.assert_array_equal(loaded["fid"]["sigma"], np.eye(3))

    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"fid": {"mu": Evil(), "sigma": np.eye(3)}}))
    with pytest.raises(UnsafePickleError):
        load_reference_stats(evil)
    bad_layout = tmp_path / "bad.pkl"
    bad_layout.write_bytes(pickle.dumps({"fid": np.eye(3)}))
    with pytest.raises(ValueError):
        load_reference_stats(bad_layout)


def test_missing_weights_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDA_EDM2_CACHE", str(tmp_path / "cache"))
    with pytest.raises(det.MissingWeightsError) as err:
        det.load_detector("fid")
    message = str(err.value)
    assert (
        det.INCEPTION_FILE in message and det.INCEPTION_URL in message and str(tmp_path / "cache") in message
    )
    with pytest.raises(det.MissingWeightsError) as err:
        det.load_detector("fd_dinov2", dinov2=tmp_path / "nowhere")
    assert det.DINOV2_REPO in str(err.value) and "nowhere" in str(err.value)
    with pytest.raises(ValueError):
        det.load_detector("is")


def test_dinov2_from_a_local_transformers_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14
    )
    torch.manual_seed(0)
    model = transformers.Dinov2Model(config).eval()
    model.save_pretrained(tmp_path / "dinov2")
    detector = det.load_dinov2(tmp_path / "dinov2")
    images = torch.randint(0, 256, [3, 3, 40, 40], dtype=torch.uint8)
    features = detector(images)
    assert features.shape == (3, 32)
    with torch.no_grad():
        expected = model(pixel_values=detector.preprocess(images)).pooler_output
    torch.testing.assert_close(features, expected)


@pytest.mark.slow
def test_statistics_equal_across_one_and_two_processes(image_set, tmp_path):
    root, array, _, inception = image_set
    torch.multiprocessing.spawn(
        stats_worker,
        args=(2, str(tmp_path / "init"), str(root / "a.npz"), inception, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    single = accumulate_stats(standin_detectors(inception), image_batches(root / "a.npz", batch_size=3))
    for name, stats in single.items():
        mu, sigma = stats.mean_cov()
        two = np.load(tmp_path / f"{name}.npz")
        assert int(two["count"]) == len(array)
        np.testing.assert_allclose(two["mu"], mu, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(two["sigma"], sigma, rtol=1e-10, atol=1e-14)
