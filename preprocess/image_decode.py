"""Decoding one source file into an 8-bit RGB image, or a reason why it cannot be used.

Policy (issue 3): grayscale, palette, alpha, CMYK and 16-bit images are converted to 8-bit RGB (the mode
they came in is reported so the encoder can count conversions); anything that does not decode fully -
truncated or corrupt files, non-image files with an image extension, decompression bombs - raises
`BadImageError` with a reason, which the encoder records (path + reason) and skips. EXIF orientation is
ignored, as in ADM/EDM2. Alpha is dropped (colour channels kept), as EDM2's `convert("RGB")` does.
"""

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class BadImageError(Exception):
    """A source file that cannot be turned into an image; `str(exc)` is the reason recorded."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's convert("RGB") clips 16-bit values at 255 instead of rescaling: map 0..65535 -> 0..255.
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB")
    if image.mode == "F":
        gray = np.clip(np.round(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL's recommended route for palettes with transparency
    return image.convert("RGB")


def decode_image(data: bytes) -> tuple[Image.Image, str, tuple[int, int]]:
    """File bytes -> (8-bit RGB image, original mode, original (width, height)); raises BadImageError."""
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning becomes an error (skip, not hang); EXIF chatter is not news.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # forces the full decode: truncated data fails here, not later
            mode, size = image.mode, image.size
            rgb = _to_rgb(image)
    except UnidentifiedImageError:
        raise BadImageError("not an image file (unidentified format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
        raise BadImageError(f"image too large: {exn}") from None
    except (OSError, SyntaxError, ValueError, EOFError, KeyError, IndexError) as exn:
        raise BadImageError(f"corrupt or truncated image: {type(exn).__name__}: {exn}") from None
    if min(size) < 1:
        raise BadImageError(f"empty image of size {size}")
    return rgb, mode, size
