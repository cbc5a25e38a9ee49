"""The demo's own pieces: the toy image generator and the tiny calibrated VAE. (The whole demo runs in
tests/test_demo.py; the toy reproduction's pieces are tested in tests/test_toy_benchmark.py.)"""

import copy

import numpy as np
import pytest
import torch

from latent.scaling import RAW_MEAN, RAW_STD
from latent.tiny_vae import (
    POSTERIOR_STD_RATIO,
    TINY_VAE_CONFIG,
    calibrate_,
    create_tiny_vae,
    fit,
    read_images,
)
from latent.vae import build_vae, encode_moments, load_vae
from preprocess.sources import open_source
from preprocess.toy_images import CLASSES, toy_image, write_toy_dataset

# Mean abs colour error (in [0, 1]) of the demo VAE's reconstructions: per image, and on the shapes.
# Measured 0.0176 / 0.0919 with the colour anchor (400 steps of 8 images); 0.0545 / 0.2025 without it,
# 0.060 / 0.268 with the first 100-step fit at 128 pixels (greens and magentas came back grey-blue).
IMAGE_COLOUR_BOUND = 0.025
SHAPE_COLOUR_BOUND = 0.11


@pytest.fixture(scope="module")
def toy_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "images"
    write_toy_dataset(root, per_class=3, resolution=64)
    return root


def test_toy_images_are_an_imagenet_style_labelled_source(toy_images):
    source = open_source(str(toy_images))
    assert source.label_source == "imagenet-synsets"
    assert source.num_classes == len(CLASSES) and len(source.items) == 3 * len(CLASSES)
    assert sorted({item.label for item in source.items}) == list(range(len(CLASSES)))
    for item in source.items:  # the folder of each file is its class
        assert item.path.startswith(f"n{item.label:08d}/toy-{item.label}-")


def test_toy_images_are_deterministic_and_class_dependent():
    a = toy_image(3, 7, resolution=64, seed=0)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, toy_image(3, 7, resolution=64, seed=0))
    assert not np.array_equal(a, toy_image(3, 8, resolution=64, seed=0))
    # the shape's colour dominates: each class's brightest-channel statistics differ from the next's
    means = [np.stack([toy_image(c, i, 64) for i in range(8)]).reshape(-1, 3).mean(0) for c in range(4)]
    assert min(np.abs(means[i] - means[i + 1]).max() for i in range(3)) > 5


def test_calibration_sets_edm2_raw_statistics_and_keeps_the_decoder(toy_images):
    torch.manual_seed(0)
    vae = build_vae(TINY_VAE_CONFIG)
    pixels = read_images(str(toy_images), 64)
    before = copy.deepcopy(vae)
    with torch.no_grad():
        old_mean = before.encode(pixels[:4].float() / 255).latent_dist.mean
        old_decoded = before.decode(old_mean).sample
    calibrate_(vae, pixels)
    mean, std = encode_moments(vae, pixels)
    assert torch.allclose(mean.mean(dim=(0, 2, 3)), torch.tensor(RAW_MEAN), atol=1e-3)
    assert torch.allclose(mean.std(dim=(0, 2, 3)), torch.tensor(RAW_STD), rtol=1e-3)
    assert torch.allclose(
        std, (POSTERIOR_STD_RATIO * torch.tensor(RAW_STD)).reshape(1, 4, 1, 1).expand_as(std)
    )
    with torch.no_grad():  # the decoder sees what it saw before: new latents decode to the old images
        decoded = vae.decode(mean[:4]).sample
    assert torch.allclose(decoded, old_decoded, atol=1e-4)


def test_create_tiny_vae_fits_and_saves_a_loadable_directory(tmp_path, toy_images):
    summary = create_tiny_vae(tmp_path / "vae", images=str(toy_images), fit_steps=2, resolution=64)
    assert summary["images"] == 3 * len(CLASSES) and summary["final_mse"] > 0 and not summary["kept"]
    vae = load_vae(str(tmp_path / "vae"))
    mean, _ = encode_moments(vae, read_images(str(toy_images), 64))
    assert mean.shape[1:] == (4, 8, 8)
    assert torch.allclose(mean.mean(dim=(0, 2, 3)), torch.tensor(RAW_MEAN), atol=1e-3)


def test_tiny_vae_refit_is_bit_identical_and_an_existing_one_is_kept(tmp_path, toy_images):
    # A rerun of the demo must not change the VAE under already encoded latents (issue 11).
    pixels = read_images(str(toy_images), 32)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        vae = build_vae(TINY_VAE_CONFIG)
        fit(vae, pixels, steps=3, batch=4, resolution=16)
        weights.append(vae.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    dest = tmp_path / "vae"
    create_tiny_vae(dest, images=str(toy_images), fit_steps=2, resolution=32)
    saved = (dest / "diffusion_pytorch_model.safetensors").read_bytes()
    again = create_tiny_vae(dest, images=str(toy_images), fit_steps=2, resolution=32)
    assert again["kept"] and (dest / "diffusion_pytorch_model.safetensors").read_bytes() == saved
    other = create_tiny_vae(dest, images=str(toy_images), fit_steps=3, resolution=32)
    assert not other["kept"]  # other settings: made anew


@pytest.mark.slow
def test_demo_vae_reproduces_the_colours_of_the_toy_images(tmp_path):
    # The demo's fit (its images, steps and resolution): each image's mean colour and the colour of its
    # shape must come back, not a brownish average (issue 11: the first demo's samples were monochrome).
    from demo import FULL

    images = tmp_path / "images"
    write_toy_dataset(images, per_class=FULL.per_class, resolution=128)
    create_tiny_vae(tmp_path / "vae", images=str(images), fit_steps=FULL.vae_fit_steps, resolution=128)
    vae = load_vae(str(tmp_path / "vae"))
    x = read_images(str(images), 128)[::5].float() / 255
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(0, 1)
    image_colour_error = (recon.mean(dim=(2, 3)) - x.mean(dim=(2, 3))).abs()  # [N, 3]
    shape = ((x.max(dim=1).values - x.min(dim=1).values) > 0.4).unsqueeze(1).float()  # saturated pixels
    area = shape.sum(dim=(2, 3)).clamp(min=1)
    shape_colour_error = ((recon - x) * shape).sum(dim=(2, 3)).abs() / area  # [N, 3]
    assert image_colour_error.mean() < IMAGE_COLOUR_BOUND, image_colour_error.mean(0)
    assert shape_colour_error.mean() < SHAPE_COLOUR_BOUND, shape_colour_error.mean(0)


def test_a_new_demo_vae_removes_what_the_old_one_made(tmp_path):
    # A rerun over another version's demo-out (another fit, other images) must not mix latents encoded
    # by the old VAE with the new one's decoder; a kept VAE keeps everything.
    import dataclasses

    from demo import QUICK, vae_stage

    names = ("images", "vae", "latents", "teacher", "student", "samples", "teacher_samples")
    paths = {name: tmp_path / name for name in names}
    write_toy_dataset(paths["images"], per_class=1, resolution=128)
    vae_stage(paths, QUICK, {})
    made = [paths[name] / "made-with-this-vae" for name in ("latents", "teacher", "samples")]
    for path in made:
        path.parent.mkdir()
        path.write_text("")
    vae_stage(paths, QUICK, {})  # the same images and settings: kept
    assert all(path.is_file() for path in made)
    vae_stage(paths, dataclasses.replace(QUICK, vae_fit_steps=1), {})  # another fit: a new VAE
    assert not any(path.parent.exists() for path in made)
    assert (paths["vae"] / "tiny_vae.json").is_file() and (paths["images"]).is_dir()
