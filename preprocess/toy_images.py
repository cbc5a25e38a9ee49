"""A small class-conditional image dataset of coloured shapes, in ImageNet's train layout (no download).

    python -m preprocess.toy_images --dest demo-out/images --per-class 50 --resolution 128

writes <dest>/n00000000/toy-0-00000.png ... <dest>/n00000009/..., one synset-style folder per class, which
encode_dataset.py reads like ImageNet's train folder (labels = folder index in sorted order). Each class
is one shape in one colour family (CLASSES below); position, size, hue jitter and the background's
gradient vary per image. Image i of class c depends only on (seed, c, i), so a rerun gives the same files.
"""

from pathlib import Path

import click
import numpy as np
from PIL import Image

# (shape, RGB colour in [0, 1]) per class; the README demo shows one grid row per class in this order.
CLASSES = [
    ("disc", (0.90, 0.15, 0.15)),
    ("square", (0.15, 0.75, 0.20)),
    ("triangle", (0.20, 0.35, 0.95)),
    ("ring", (0.95, 0.85, 0.10)),
    ("cross", (0.85, 0.20, 0.85)),
    ("diamond", (0.10, 0.85, 0.85)),
    ("hstripes", (0.95, 0.55, 0.10)),
    ("vstripes", (0.55, 0.25, 0.85)),
    ("two_discs", (0.95, 0.95, 0.95)),
    ("frame", (0.50, 0.80, 0.30)),
]


def synset_name(label: int) -> str:
    """The folder name of class `label` (an ImageNet-style id, so the source reader labels it)."""
    return f"n{label:08d}"


def _shape_mask(
    shape: str, u: np.ndarray, v: np.ndarray, radius: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of `shape` centred at (0, 0) in coordinates u (right) and v (down), size `radius`."""
    au, av = np.abs(u), np.abs(v)
    if shape == "disc":
        return u**2 + v**2 <= radius**2
    if shape == "square":
        return np.maximum(au, av) <= radius * 0.85
    if shape == "triangle":  # pointing up: inside the three half-planes of an isosceles triangle
        return (v <= radius * 0.8) & (2 * au <= (v + radius) * 0.9)
    if shape == "ring":
        r2 = u**2 + v**2
        return (r2 <= radius**2) & (r2 >= (0.6 * radius) ** 2)
    if shape == "cross":
        arm = 0.3 * radius
        return ((au <= arm) & (av <= radius)) | ((av <= arm) & (au <= radius))
    if shape == "diamond":
        return au + av <= radius
    if shape in ("hstripes", "vstripes"):
        along = v if shape == "hstripes" else u
        period = radius * rng.uniform(0.45, 0.6)
        return (np.maximum(au, av) <= radius) & (np.mod(along, period) < period / 2)
    if shape == "two_discs":
        gap = radius * 0.55
        return ((u - gap) ** 2 + v**2 <= (0.45 * radius) ** 2) | (
            (u + gap) ** 2 + v**2 <= (0.45 * radius) ** 2
        )
    if shape == "frame":
        outer = np.maximum(au, av) <= radius
        return outer & ~(np.maximum(au, av) <= 0.65 * radius)
    raise ValueError(f"unknown shape {shape!r}")


def toy_image(label: int, index: int, resolution: int = 128, seed: int = 0) -> np.ndarray:
    """Image `index` of class `label`: uint8 [resolution, resolution, 3]."""
    rng = np.random.default_rng([seed, label, index])
    shape, colour = CLASSES[label]
    y, x = np.mgrid[0:resolution, 0:resolution].astype(np.float64) / resolution  # in [0, 1)
    # Background: a dark gradient in a random direction, so the VAE and the networks see texture too.
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)) + 0.5
    base = rng.uniform(0.05, 0.25, size=3)
    background = base + 0.2 * ramp[..., None] * rng.uniform(0.3, 1.0, size=3)
    # Foreground: the class's shape at a random place and size, its colour jittered a little.
    radius = rng.uniform(0.18, 0.32)
    cx, cy = rng.uniform(radius, 1 - radius, size=2)
    mask = _shape_mask(shape, x - cx, y - cy, radius, rng)
    fg = np.clip(np.asarray(colour) + rng.normal(0, 0.06, size=3), 0, 1)
    image = np.where(mask[..., None], fg, background)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_toy_dataset(
    dest: str | Path, per_class: int, resolution: int = 128, num_classes: int = len(CLASSES), seed: int = 0
) -> int:
    """Write `per_class` PNGs for each of the first `num_classes` classes; returns the number written."""
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must lie in [1, {len(CLASSES)}], got {num_classes}")
    dest = Path(dest)
    count = 0
    for label in range(num_classes):
        folder = dest / synset_name(label)
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = Image.fromarray(toy_image(label, index, resolution, seed), mode="RGB")
            image.save(folder / f"toy-{label}-{index:05d}.png")
            count += 1
    return count


@click.command()
@click.option("--dest", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--per-class", default=50, show_default=True, type=click.IntRange(1), help="Images per class.")
@click.option(
    "--resolution", default=128, show_default=True, type=click.IntRange(16), help="Pixels per side."
)
@click.option(
    "--classes", "num_classes", default=len(CLASSES), show_default=True, type=click.IntRange(1, len(CLASSES))
)
@click.option("--seed", default=0, show_default=True, help="Seed of the per-image variations.")
def main(dest: str, per_class: int, resolution: int, num_classes: int, seed: int) -> None:
    """Write a class-conditional toy image dataset (ImageNet train layout) to --dest."""
    count = write_toy_dataset(dest, per_class, resolution, num_classes, seed)
    click.echo(f"{dest}: {count} images, {num_classes} classes, {resolution}x{resolution}")


if __name__ == "__main__":
    main()
