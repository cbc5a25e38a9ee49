"""Test helpers of the latent-dataset part: a tiny real AutoencoderKL, image files of every awkward
kind, and a small EDM2-format img512-sd.zip. Everything is written by the tests; nothing is downloaded."""

import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from latent.vae import SD_VAE_FT_MSE_CONFIG, build_vae

# Same block types as sd-vae-ft-mse, 4 levels -> 3 downsamplings -> latents at 1/8 of the pixels.
TINY_VAE_CONFIG = {
    **SD_VAE_FT_MSE_CONFIG,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 32,
}


def save_tiny_vae(directory: Path, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    vae = build_vae(TINY_VAE_CONFIG)
    vae.save_pretrained(directory)
    return directory


def random_rgb(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def encode_file(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def awkward_files(seed: int = 0) -> dict[str, bytes | None]:
    """name -> file bytes: usable images of every mode, and unusable files (their names say so)."""
    base = random_rgb(48, 40, seed)
    jpeg = encode_file(base, "JPEG", quality=90)
    sixteen = Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 34).astype(np.uint16))
    return {
        "rgb.JPEG": jpeg,
        "png.png": encode_file(random_rgb(50, 44, seed + 1), "PNG"),
        "cmyk.JPEG": encode_file(random_rgb(40, 52, seed + 2).convert("CMYK"), "JPEG"),
        "gray.JPEG": encode_file(random_rgb(64, 40, seed + 3).convert("L"), "JPEG"),
        "palette.png": encode_file(random_rgb(40, 40, seed + 4).convert("P"), "PNG"),
        "alpha.png": encode_file(random_rgb(44, 40, seed + 5).convert("RGBA"), "PNG"),
        "sixteen.png": encode_file(sixteen, "PNG"),
        "tiny.JPEG": encode_file(random_rgb(5, 3, seed + 6), "JPEG"),
        "bad_truncated.JPEG": jpeg[: len(jpeg) // 2],
        "bad_text.JPEG": b"this is a text file with an image extension\n",
    }


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def imagenet_tree(root: Path, synsets=("n01440764", "n01443537", "n02102040"), per_class: int = 4) -> Path:
    """ImageNet train layout; one synset also holds the awkward files, so every kind is encoded."""
    files = {}
    for c, synset in enumerate(synsets):
        for i in range(per_class):
            image = random_rgb(40 + 8 * i, 36 + 4 * c, seed=100 * c + i)
            files[f"{synset}/{synset}_{i}.JPEG"] = encode_file(image, "JPEG", quality=90)
    for name, data in awkward_files().items():
        files[f"{synsets[1]}/{synsets[1]}_{Path(name).stem}{Path(name).suffix}"] = data
    return write_tree(root, files)


def write_edm2_latent_zip(path: Path, labels: list[int], latent_size: int = 8, seed: int = 0) -> np.ndarray:
    """EDM2's img512-sd.zip layout: 00000/img00000000.npy ([8,h,w] float32 = mean; std) + dataset.json."""
    rng = np.random.default_rng(seed)
    moments = rng.normal(size=(len(labels), 8, latent_size, latent_size)).astype(np.float32)
    moments[:, 4:] = np.abs(moments[:, 4:]) * 0.1
    entries = []
    with zipfile.ZipFile(path, "w") as zf:
        for i, label in enumerate(labels):
            name = f"{i // 1000:05d}/img{i:08d}.npy"
            buffer = io.BytesIO()
            np.save(buffer, moments[i])
            zf.writestr(name, buffer.getvalue())
            entries.append([name, label])
        zf.writestr("dataset.json", json.dumps({"labels": entries}))
    return moments
