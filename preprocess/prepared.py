"""A map-style dataset that turns source items into what the encoder consumes, in worker processes.

For image sources an item becomes uint8 pixels [3, R, R] (decoded, converted to RGB, ADM/EDM2 crop);
for EDM2 latent zips it becomes the stored moments [8, h, w] float32. An item that cannot be used comes
back with `reason` set instead (never an exception), so one bad file cannot stop a DataLoader.
Use `collate_prepared` as the DataLoader's collate_fn: a batch is {"records": the records, "pixels": the
usable images' pixels stacked into one uint8 tensor [n, 3, R, R] in record order, or None}; one tensor
per batch is what the DataLoader pins, so the copy to the GPU is asynchronous.
"""

from io import BytesIO

import numpy as np
import torch

from preprocess.crop import center_crop_dhariwal, crop_geometry
from preprocess.image_decode import BadImageError, decode_image
from preprocess.sources import Source, SourceItem


def _prepare_image(data: bytes, resolution: int) -> dict:
    image, mode, (width, height) = decode_image(data)
    pixels = center_crop_dhariwal(image, resolution)
    return {
        "pixels": np.ascontiguousarray(pixels.transpose(2, 0, 1)),
        "mode": mode,
        "upscaled": crop_geometry(width, height, resolution).upscaled,
        "info": {"original_size": [width, height], "original_mode": mode},
    }


def _prepare_moments(data: bytes) -> dict:
    try:
        moments = np.load(BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exn:
        raise BadImageError(f"unreadable .npy: {exn}") from None
    if moments.ndim != 3 or moments.shape[0] % 2 or not np.issubdtype(moments.dtype, np.floating):
        raise BadImageError(f"expected float moments [2C, h, w], got {moments.dtype} {list(moments.shape)}")
    if not np.isfinite(moments).all():
        raise BadImageError("non-finite values in the stored moments")
    return {"moments": moments.astype(np.float32), "mode": None, "upscaled": False, "info": {}}


class PreparedItems(torch.utils.data.Dataset):
    def __init__(
        self,
        source: Source,  # where the bytes come from
        items: list[SourceItem],  # the items to prepare, in order (dataset index = position here)
        resolution: int,  # crop size for images
    ):
        self.source, self.items, self.resolution = source, items, resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        record = {"index": index, "item": item, "reason": None}
        try:
            data = self.source.read(item)
            if self.source.kind == "edm2-latents":
                record.update(_prepare_moments(data))
            else:
                record.update(_prepare_image(data, self.resolution))
        except BadImageError as exn:
            record["reason"] = str(exn)
        except OSError as exn:  # unreadable file (permissions, I/O error)
            record["reason"] = f"cannot read: {exn}"
        return record


def collate_prepared(records: list[dict]) -> dict:
    """Records -> {"records": records without their pixels, "pixels": uint8 [n,3,R,R] or None}.
    Only usable image records carry pixels, so row i of "pixels" is the i-th usable record's image."""
    pixels = [r.pop("pixels") for r in records if "pixels" in r]
    return {"records": records, "pixels": torch.from_numpy(np.stack(pixels)) if pixels else None}
