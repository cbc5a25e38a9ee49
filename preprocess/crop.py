"""The ADM / EDM2 "center-crop-dhariwal" rule (docs/ARCHITECTURE.md, "Data flow"), exactly.

1. While the short side is at least twice the target, halve both sides (floor) with a BOX filter.
2. Resize so the short side equals the target, with BICUBIC; the long side is round(long * scale) using
   Python's round (half to even), as the reference does.
3. Crop the centre, with floor offsets ((size - target) // 2).
Images smaller than the target are upscaled by step 2 (the encoder counts them).
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class CropGeometry:
    """Where an image of a given size goes through the crop rule."""

    halvings: int  # number of BOX halvings
    halved_size: tuple[int, int]  # (width, height) after the halvings
    resized_size: tuple[int, int]  # (width, height) after the BICUBIC resize
    offset: tuple[int, int]  # (x, y) of the top-left corner of the crop
    upscaled: bool  # the short side was below the target, so step 2 enlarged the image


def crop_geometry(width: int, height: int, resolution: int) -> CropGeometry:
    halvings, w, h = 0, width, height
    while min(w, h) >= 2 * resolution:
        w, h, halvings = w // 2, h // 2, halvings + 1
    scale = resolution / min(w, h)
    rw, rh = round(w * scale), round(h * scale)
    return CropGeometry(
        halvings=halvings,
        halved_size=(w, h),
        resized_size=(rw, rh),
        offset=((rw - resolution) // 2, (rh - resolution) // 2),
        upscaled=min(width, height) < resolution,
    )


def center_crop_dhariwal(image: Image.Image, resolution: int) -> np.ndarray:
    """An 8-bit RGB PIL image -> uint8 array [resolution, resolution, 3] by the ADM/EDM2 rule."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode} (convert it first)")
    geometry = crop_geometry(image.width, image.height, resolution)
    for _ in range(geometry.halvings):
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    image = image.resize(geometry.resized_size, resample=Image.BICUBIC)
    x, y = geometry.offset
    return np.asarray(image)[y : y + resolution, x : x + resolution]
