"""Bad-input policy: awkward modes become 8-bit RGB, unusable files raise BadImageError with a reason."""

import numpy as np
import pytest
from helpers_latent import awkward_files, encode_file, random_rgb
from PIL import Image

from preprocess.image_decode import BadImageError, decode_image

FILES = awkward_files()


@pytest.mark.parametrize("name", [n for n in FILES if not n.startswith("bad_")])
def test_usable_files_become_8bit_rgb(name):
    image, _, size = decode_image(FILES[name])
    assert image.mode == "RGB"
    assert np.asarray(image).dtype == np.uint8
    assert image.size == size


def test_reported_modes():
    modes = {name: decode_image(data)[1] for name, data in FILES.items() if not name.startswith("bad_")}
    assert modes["cmyk.JPEG"] == "CMYK" and modes["gray.JPEG"] == "L" and modes["palette.png"] == "P"
    assert modes["alpha.png"] == "RGBA" and modes["sixteen.png"].startswith("I")


def test_sixteen_bit_is_rescaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535, 257 * 37 + 100]], dtype=np.uint16)
    image, _, _ = decode_image(encode_file(Image.fromarray(values), "PNG"))
    np.testing.assert_array_equal(np.asarray(image)[0, :, 0], [0, 100, 255, 37])
    np.testing.assert_array_equal(np.asarray(image)[..., 0], np.asarray(image)[..., 2])


def test_grayscale_keeps_its_values():
    gray = random_rgb(16, 16, 1).convert("L")
    image, _, _ = decode_image(encode_file(gray, "PNG"))
    for channel in range(3):
        np.testing.assert_array_equal(np.asarray(image)[..., channel], np.asarray(gray))


def test_palette_with_transparency_converts():
    palette = random_rgb(20, 20, 2).convert("P")
    image, mode, _ = decode_image(encode_file(palette, "GIF", transparency=0))
    assert mode == "P" and image.mode == "RGB"


@pytest.mark.parametrize(
    ("name", "reason"), [("bad_truncated.JPEG", "truncated"), ("bad_text.JPEG", "not an image")]
)
def test_unusable_files_give_a_reason(name, reason):
    with pytest.raises(BadImageError, match=reason):
        decode_image(FILES[name])


def test_truncated_png_is_rejected():
    png = encode_file(random_rgb(64, 64, 5), "PNG")
    with pytest.raises(BadImageError, match=r"truncated|corrupt"):
        decode_image(png[: len(png) // 3])
