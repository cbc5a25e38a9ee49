"""The ADM/EDM2 center crop on known sizes, and its pixels against hand-unrolled PIL calls."""

import numpy as np
import pytest
from helpers_latent import random_rgb
from PIL import Image

from preprocess.crop import center_crop_dhariwal, crop_geometry


@pytest.mark.parametrize(
    ("size", "resolution", "halvings", "resized", "offset", "upscaled"),
    [
        ((1200, 900), 512, 0, (683, 512), (85, 0), False),  # 1200*512/900 = 682.67
        ((2048, 1100), 512, 1, (953, 512), (220, 0), False),  # one halving to 1024x550
        ((4000, 3000), 512, 2, (683, 512), (85, 0), False),  # 2000x1500 -> 1000x750
        ((1024, 1024), 512, 1, (512, 512), (0, 0), False),  # short side exactly 2x: halved
        ((512, 512), 512, 0, (512, 512), (0, 0), False),
        ((500, 700), 512, 0, (512, 717), (0, 102), True),  # portrait, slightly small
        ((100, 60), 512, 0, (853, 512), (170, 0), True),  # tiny: upscaled
        ((6, 4), 3, 0, (4, 3), (0, 0), False),  # 6*3/4 = 4.5: Python's round gives 4 (half to even)
    ],
)
def test_crop_geometry_known_sizes(size, resolution, halvings, resized, offset, upscaled):
    geometry = crop_geometry(*size, resolution)
    assert geometry.halvings == halvings
    assert geometry.resized_size == resized
    assert geometry.offset == offset
    assert geometry.upscaled == upscaled


def test_crop_pixels_match_the_unrolled_rule():
    image = random_rgb(260, 140, seed=3)
    # 140 >= 2*64: one BOX halving to 130x70; 130*64/70 = 118.86 -> 119; x offset (119-64)//2 = 27.
    expected = image.resize((130, 70), Image.BOX).resize((119, 64), Image.BICUBIC).crop((27, 0, 91, 64))
    result = center_crop_dhariwal(image, 64)
    assert result.dtype == np.uint8 and result.shape == (64, 64, 3)
    np.testing.assert_array_equal(result, np.asarray(expected))


def test_crop_portrait_offsets_vertically():
    image = random_rgb(40, 90, seed=4)  # 40 < 2*32: no halving; 90*32/40 = 72 -> crop rows 20..52
    expected = image.resize((32, 72), Image.BICUBIC).crop((0, 20, 32, 52))
    np.testing.assert_array_equal(center_crop_dhariwal(image, 32), np.asarray(expected))


def test_crop_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        center_crop_dhariwal(random_rgb(40, 40, 0).convert("L"), 32)
