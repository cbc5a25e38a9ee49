"""The files decode_samples.py writes: a PNG tree (the per-seed record), an .npz, a grid image.

    <outdir>/000000/000123.png     seed 123 (1000 seeds per folder); PNG text chunks 'seed' and 'class'
    <outdir>/images.npz            arr_0: uint8 [N,H,W,3] in seed-list order; labels: int64 [N] (-1: none)
    <outdir>/grid.png              the first images of the seed list, tiled row by row

The PNG tree doubles as the resume record: a PNG exists only once it is complete (written under a
temporary name, then renamed). The .npz is streamed member by member into the zip, so 50k images at
512x512 (39 GB) never need to be in memory at once; np.load reads it like any np.savez file.
"""

import functools
import math
import multiprocessing
import os
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.PngImagePlugin

NPZ_NAME = "images.npz"
GRID_NAME = "grid.png"


def png_path(outdir: str | os.PathLike, seed: int) -> Path:
    """Where the image of `seed` lives: <outdir>/<seed rounded down to 1000, 6 digits>/<seed:06d>.png."""
    return Path(outdir) / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"


def write_png(path: str | os.PathLike, image: np.ndarray, seed: int, label: int | None) -> None:
    """Write one uint8 [H,W,3] image atomically, with its seed and class (if any) as PNG text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("seed", str(seed))
    if label is not None and label >= 0:
        info.add_text("class", str(label))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    PIL.Image.fromarray(image, "RGB").save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def read_png(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(uint8 [H,W,3], class index or -1) of a PNG written by `write_png`."""
    with PIL.Image.open(path) as img:
        label = int(img.text.get("class", -1))
        return np.asarray(img.convert("RGB")), label


def missing_seeds(outdir: str | os.PathLike, seeds: Iterable[int]) -> list[int]:
    """The seeds whose PNG is not in the tree yet (what a rerun still has to make)."""
    return [s for s in seeds if not png_path(outdir, s).is_file()]


@functools.cache
def _encoder_processes(count: int) -> ProcessPoolExecutor:
    """`count` PNG encoder processes, started once per program and shared by every PngWriter. They are
    forked from a fresh server process ("forkserver": this process may hold a CUDA context, which must
    not be forked), which imports the program's modules once for all of them. They end with the program."""
    return ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context("forkserver"))


class PngWriter:
    """Writes PNGs in the background while the GPU makes the next batch; at most `max_pending` images
    wait in memory. Errors surface at `submit` or `close`.

    processes = 0 encodes on `num_threads` threads of this process (zlib releases the GIL, PIL's filter
    and the rest of its PNG encoder do not); processes > 0 on that many worker processes."""

    def __init__(
        self,
        outdir: str | os.PathLike,  # Root of the PNG tree.
        num_threads: int = 8,  # Encoder threads (when processes is 0).
        max_pending: int = 256,  # Images queued before submit() waits.
        processes: int = 0,  # Encoder processes (0: threads).
    ):
        self.outdir = Path(outdir)
        self.max_pending = max_pending
        self._pool: Executor = (
            _encoder_processes(processes) if processes else ThreadPoolExecutor(max_workers=num_threads)
        )
        self._pending: list[Future] = []

    def submit(self, images: np.ndarray, seeds: Sequence[int], labels: Sequence[int] | None) -> None:
        """Queue uint8 [N,H,W,3] images for `seeds` (labels per image, or None)."""
        for i, seed in enumerate(seeds):
            label = None if labels is None else int(labels[i])
            self._pending.append(
                self._pool.submit(write_png, png_path(self.outdir, seed), images[i], int(seed), label)
            )
        while len(self._pending) > self.max_pending:
            self._pending.pop(0).result()

    def close(self) -> None:
        """Wait for every queued image; re-raise the first error."""
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pending.clear()
            if isinstance(self._pool, ThreadPoolExecutor):  # the processes serve the next writer too
                self._pool.shutdown(wait=True)

    def __enter__(self) -> "PngWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_npz_from_pngs(
    dest: str | os.PathLike, outdir: str | os.PathLike, seeds: Sequence[int], array_name: str = "arr_0"
) -> Path:
    """Stream the PNGs of `seeds` (in order) into `dest` as uint8 [N,H,W,3] plus int64 labels [N]."""
    dest = Path(dest)
    first, _ = read_png(png_path(outdir, seeds[0]))
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
        "fortran_order": False,
        "shape": (len(seeds), *first.shape),
    }
    labels = np.empty(len(seeds), dtype=np.int64)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(f"{array_name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, header)
            for i, seed in enumerate(seeds):
                image, labels[i] = read_png(png_path(outdir, seed))
                if image.shape != first.shape:
                    raise ValueError(f"seed {seed}: image shape {image.shape} != {first.shape}")
                member.write(np.ascontiguousarray(image).tobytes())
        with zf.open("labels.npy", "w") as member:
            np.lib.format.write_array(member, labels)
    os.replace(tmp, dest)
    return dest


def tile_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """uint8 [N,H,W,3] -> one [rows*H, columns*W, 3] image, row by row, black where tiles run out.
    columns defaults to ceil(sqrt(N))."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.zeros([rows * columns, h, w, c], dtype=images.dtype)
    canvas[:n] = images
    return canvas.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def write_grid_from_pngs(dest: str | os.PathLike, outdir: str | os.PathLike, seeds: Sequence[int]) -> Path:
    """A grid PNG of the images of `seeds` (callers pass the first few of the seed list)."""
    images = np.stack([read_png(png_path(outdir, s))[0] for s in seeds])
    dest = Path(dest)
    PIL.Image.fromarray(tile_grid(images), "RGB").save(dest)
    return dest
