"""uint8 image batches [B,3,H,W] for the metrics, from a folder, an .npz, or latent shards.

    batches = image_batches("out/", batch_size=64)                 # every image file under out/
    batches = image_batches("out/images.npz", batch_size=64)       # arr_0 uint8 [N,H,W,3]
    batches = image_batches("data/latents", batch_size=16, vae=vae)  # decoded latent shards
    batches = image_batches(list_of_png_paths, batch_size=64)      # exactly these files

Each rank reads a disjoint share (files: every world_size-th; npz: a contiguous block). Shards are read
in one exact pass (latent.reader, resampled=False) and decoded with the VAE: statistics of VAE
reconstructions of a posterior draw, not of the original images. All images of a source must share
one size (crop them first, as encode_dataset.py does).
"""

import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from latent.manifest import MANIFEST
from latent.reader import LatentLoader
from latent.vae import decode_to_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageFiles(torch.utils.data.Dataset):
    """Image files as uint8 [3,H,W] tensors (RGB)."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],  # The files, in the order they are read.
    ):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with PIL.Image.open(self.paths[index]) as img:
            array = np.asarray(img.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file under `folder` (recursively, hidden entries skipped), sorted by path."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _stack_same_size(images: list[torch.Tensor]) -> torch.Tensor:
    shapes = sorted({tuple(img.shape) for img in images})
    if len(shapes) > 1:
        raise ValueError(
            f"images of different sizes {shapes} in one source (a grid.png among the samples?); "
            "pass the .npz or a folder of equally sized images"
        )
    return torch.stack(images)


def _file_batches(paths: Sequence[Path], batch_size: int, num_workers: int) -> Iterator[torch.Tensor]:
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths), batch_size=batch_size, num_workers=num_workers, collate_fn=_stack_same_size
    )
    yield from loader


def _npz_member(zf: zipfile.ZipFile, name: str) -> tuple[zipfile.ZipExtFile, tuple[int, ...], np.dtype]:
    member = zf.open(f"{name}.npy")
    version = np.lib.format.read_magic(member)
    read_header = (
        np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    )
    shape, fortran_order, dtype = read_header(member)
    if fortran_order:
        raise ValueError(f"{name} is stored in Fortran order; expected C order")
    return member, shape, dtype


def npz_image_count(path: str | os.PathLike, array_name: str = "arr_0") -> int:
    """Number of images in an .npz without reading them."""
    with zipfile.ZipFile(path) as zf:
        member, shape, _ = _npz_member(zf, array_name)
        member.close()
    return shape[0]


def _npz_batches(
    path: Path, batch_size: int, rank: int, world_size: int, max_images: int | None, array_name: str = "arr_0"
) -> Iterator[torch.Tensor]:
    """Stream this rank's contiguous block of arr_0 (uint8 [N,H,W,3]) without loading the whole array."""
    with zipfile.ZipFile(path) as zf:
        member, shape, dtype = _npz_member(zf, array_name)
        with member:
            if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
                raise ValueError(f"{path}: {array_name} must be uint8 [N,H,W,3], got {dtype} {shape}")
            total = shape[0] if max_images is None else min(shape[0], max_images)
            start, stop = total * rank // world_size, total * (rank + 1) // world_size
            image_bytes = int(np.prod(shape[1:]))
            member.seek(member.tell() + start * image_bytes)
            for first in range(start, stop, batch_size):
                count = min(batch_size, stop - first)
                data = member.read(count * image_bytes)
                array = np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])
                yield torch.from_numpy(array.copy()).permute(0, 3, 1, 2)


def _shard_batches(
    shard_dir: Path,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    vae,
    max_images: int | None,
) -> Iterator[torch.Tensor]:
    if vae is None:
        raise ValueError(f"{shard_dir} holds latent shards: decoding them needs a VAE (--vae)")
    device = next(vae.parameters()).device
    loader = LatentLoader(
        str(shard_dir), batch_size, rank=rank, world_size=world_size, num_workers=num_workers, resampled=False
    )
    limit = (
        None
        if max_images is None
        else max_images * (rank + 1) // world_size - max_images * rank // world_size
    )
    done = 0
    for latents, _ in loader:
        if limit is not None:
            latents = latents[: limit - done]
        if len(latents):
            yield decode_to_uint8(vae, latents.to(device)).cpu()
            done += len(latents)
        if limit is not None and done >= limit:
            break


def image_batches(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    batch_size: int = 64,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    vae=None,
    max_images: int | None = None,
) -> Iterator[torch.Tensor]:
    """This rank's uint8 [B,3,H,W] batches of `source` (module docstring); max_images caps the total
    over all ranks (the first images in the source's order)."""
    if not isinstance(source, (str, os.PathLike)):
        paths = [Path(p) for p in source][:max_images]
        return _file_batches(paths[rank::world_size], batch_size, num_workers)
    source = Path(source)
    if source.is_file() and source.suffix == ".npz":
        return _npz_batches(source, batch_size, rank, world_size, max_images)
    if source.is_dir() and (source / MANIFEST).is_file():
        return _shard_batches(source, batch_size, rank, world_size, num_workers, vae, max_images)
    if source.is_dir():
        paths = list_image_files(source)[:max_images]
        if not paths:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {source}")
        return _file_batches(paths[rank::world_size], batch_size, num_workers)
    raise FileNotFoundError(f"{source} is not an image folder, an .npz or a latent shard folder")
