"""What decode_samples.py does, as functions: find the network, make and write the images of a seed list.

    path = resolve_network_path("runs/xs-sida")          # run dir -> export-latest.safetensors (or newest)
    made = write_images(net, vae, seeds=range(50000), outdir="out", batch=64, rank=r, world_size=w)

Images depend only on their seed (sida_edm2.sample.sampling), so a rerun makes only the seeds whose PNG is
missing, and the ranks split those (interleaved, disjoint) so that they finish together.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import tqdm

from latent.host_copy import HostCopy
from latent.vae import decode_to_uint8
from sida_edm2.io.network_files import ACCEPTED_FORMATS
from sida_edm2.sample.sample_files import PngWriter, missing_seeds
from sida_edm2.sample.sampling import generate_latents, teacher_latents
from sida_edm2.sample.seeds import batches, rank_slice
from sida_edm2.sample.torchrun_env import barrier

# How training run directories name their generator exports, in order of preference (newest = last by name).
EXPORT_LATEST = "export-latest.safetensors"
EXPORT_PATTERNS = ("export-*.safetensors", "exports/*.safetensors", "network-snapshot-*.safetensors")


def resolve_network_path(path: str | os.PathLike) -> Path:
    """A network file as given, or for a training run directory its latest export: <run>/export-latest
    .safetensors, else the last by name of the first of these patterns that matches anything:
    <run>/export-*.safetensors, <run>/exports/*.safetensors, <run>/network-snapshot-*.safetensors."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no network file or run directory at {path}; expected {ACCEPTED_FORMATS}")
    if (path / EXPORT_LATEST).is_file():
        return path / EXPORT_LATEST
    for pattern in EXPORT_PATTERNS:
        candidates = [p for p in path.glob(pattern) if p.name != EXPORT_LATEST and p.is_file()]
        if candidates:
            return max(candidates, key=lambda p: p.name)
    raise FileNotFoundError(f"{path} holds no export ({EXPORT_LATEST} or {', '.join(EXPORT_PATTERNS)})")


def classes_for_seeds(seeds: Sequence[int], classes: Sequence[int] | None) -> dict[int, int] | None:
    """Seed -> class when classes are given: the i-th seed of the list gets classes[i % len(classes)]
    (one class for all, or a list repeated along the seeds). None: each seed draws its own class."""
    if classes is None:
        return None
    return {seed: classes[i % len(classes)] for i, seed in enumerate(seeds)}


@torch.no_grad()
def make_latents(
    net: torch.nn.Module,
    seeds: Sequence[int],
    class_of: dict[int, int] | None,
    *,
    teacher_steps: int | None = None,
    sigmas: Sequence[float] = (),
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents of `seeds`: one-step generator (plus few-step `sigmas`), or with teacher_steps set, the
    network as an EDM2 denoiser under the Heun sampler."""
    labels = None if class_of is None else [class_of[s] for s in seeds]
    if teacher_steps is not None:
        return teacher_latents(net, seeds, labels, num_steps=teacher_steps, device=device, dtype=dtype)
    return generate_latents(net, seeds, labels, device=device, dtype=dtype, sigmas=sigmas)


@torch.no_grad()
def write_images(
    net: torch.nn.Module,
    vae: torch.nn.Module,
    seeds: Sequence[int],
    outdir: str | os.PathLike,
    *,
    batch: int = 64,
    classes: Sequence[int] | None = None,
    teacher_steps: int | None = None,
    sigmas: Sequence[float] = (),
    dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    progress: bool = True,
    png_processes: int = 0,
    pad_batches: bool = False,
) -> int:
    """Make this rank's share of the missing images of `seeds` and write them to the PNG tree under
    `outdir`. Every rank of a process group must call it (it synchronises once, before writing).
    png_processes: PNG encoder processes (0: threads, see PngWriter); pad_batches: decode the last,
    smaller batch padded to `batch` (for a VAE compiled for fixed shapes).
    Returns the number of images this rank made."""
    seeds = list(seeds)
    class_of = classes_for_seeds(seeds, classes)
    # Every rank lists the missing seeds before any rank writes, so all see the same list.
    todo = rank_slice(missing_seeds(outdir, seeds), rank, world_size)
    barrier()
    bar = tqdm.tqdm(total=len(todo), unit="img", desc=f"rank {rank}", disable=not progress, smoothing=0.1)
    pad_to = batch if pad_batches else None

    def write(copy: HostCopy, batch_seeds: list[int]) -> None:
        images, *labels = copy.wait()
        writer.submit(images, batch_seeds, labels[0].tolist() if labels else None)
        bar.update(len(batch_seeds))

    # One batch in flight: batch n+1 is queued on the GPU before batch n's images are awaited, so the
    # GPU keeps working while the host hands batch n to the PNG encoders.
    pending = None
    with PngWriter(outdir, processes=png_processes) as writer:
        for batch_seeds in batches(todo, batch):
            latents, labels = make_latents(
                net,
                batch_seeds,
                class_of,
                teacher_steps=teacher_steps,
                sigmas=sigmas,
                dtype=dtype,
                device=device,
            )
            images = decode_to_uint8(vae, latents, pad_to).permute(0, 2, 3, 1).contiguous()
            submitted = (HostCopy([images] if labels is None else [images, labels]), list(batch_seeds))
            if pending is not None:
                write(*pending)
            pending = submitted
        if pending is not None:
            write(*pending)
    bar.close()
    return len(todo)
