"""Generate images with a one-step generator (or an EDM2 teacher), decode them with the SD-VAE, write
PNGs / an .npz / a grid, and optionally compute FID and FD_DINOv2.

    # 64 images of random classes from a training run's latest export, as PNGs and a grid
    python decode_samples.py --generator runs/xs-sida --seeds 0-63 --outdir out --format png,grid

    # The paper's protocol: 50k images, seeds 0-49999, FID and FD_DINOv2 against EDM2's statistics
    torchrun --standalone --nproc_per_node 8 decode_samples.py --generator xs-export.safetensors \\
        --seeds 0-49999 --outdir out-50k --format png,npz --metrics fid,fd_dinov2 --ref img512.pkl

    # The EDM2 teacher with its deterministic 32-step Heun sampler (63 evaluations), class 88 only
    python decode_samples.py --generator edm2-img512-xs-2147483-0.135.pkl --teacher-steps 32 \\
        --classes 88 --seeds 0-15 --outdir teacher

Rerunning the same command makes only the images whose PNG is missing. Images depend only on their
seed (and class), not on --batch or the number of processes.
"""

import json
import shutil
from pathlib import Path

import click
import torch

from latent.vae import load_vae
from sida_edm2.io.network_files import UNUSABLE_CHECKPOINT, load_network
from sida_edm2.model.networks import PRECISION_DTYPES
from sida_edm2.sample import metrics as fd
from sida_edm2.sample.generate_images import resolve_network_path, write_images
from sida_edm2.sample.image_sources import image_batches
from sida_edm2.sample.sample_files import (
    GRID_NAME,
    NPZ_NAME,
    png_path,
    write_grid_from_pngs,
    write_npz_from_pngs,
)
from sida_edm2.sample.sampling import check_sigmas
from sida_edm2.sample.seeds import parse_int_list
from sida_edm2.sample.torchrun_env import barrier, join_torchrun, leave_process_group

FORMATS = ("png", "npz", "grid")
STAGING_DIR = ".png-staging"  # the PNG tree when png is not a requested format (removed at the end)


def _int_list(ctx, param, value):
    try:
        return None if value is None else parse_int_list(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def _sigma_list(ctx, param, value):
    try:
        sigmas = [float(v) for v in value.split(",") if v.strip()] if value else []
        check_sigmas(sigmas)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    return sigmas


def _formats(ctx, param, value):
    names = [n.strip() for item in value for n in item.split(",") if n.strip()]
    unknown = sorted(set(names) - set(FORMATS))
    if unknown or not names:
        problem = f"unknown format(s) {', '.join(unknown)}" if unknown else "no format given"
        raise click.BadParameter(f"{problem}; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(names))


def _open_network(network_path: Path, classes: list[int] | None, device: torch.device) -> torch.nn.Module:
    """The generator (or teacher) of `network_path`, once it is known to have the requested classes."""
    try:
        net = load_network(network_path, device=device)
    except UNUSABLE_CHECKPOINT as err:
        raise click.ClickException(str(err)) from None
    if classes is not None and not all(0 <= c < net.label_dim for c in classes):
        raise click.BadParameter(
            f"{network_path} has {net.label_dim} classes: use classes 0-{net.label_dim - 1}"
            if net.label_dim
            else f"{network_path} is unconditional: leave --classes out",
            param_hint="'--classes'",
        )
    return net


@click.command()
@click.option(
    "--generator", required=True, help="Export .safetensors, training run dir, SiD/SiDA or EDM2 .pkl."
)
@click.option(
    "--teacher-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Treat --generator as an EDM2 "
    "denoiser and run the Heun sampler with this many steps (32: EDM2's 63 evaluations).",
)
@click.option(
    "--few-step-sigmas",
    "sigmas",
    default="",
    callback=_sigma_list,
    help="Few-step generation: re-noise and denoise at these decreasing sigmas < 2.5 (e.g. 1.0,0.3).",
)
@click.option(
    "--vae", default="stabilityai/sd-vae-ft-mse", show_default=True, help="VAE hub id or local dir."
)
@click.option(
    "--seeds", default="0-63", show_default=True, callback=_int_list, help="E.g. 0-49999 or 0-9,20."
)
@click.option(
    "--classes",
    default=None,
    callback=_int_list,
    help="One class, or a list repeated along the seeds [default: random per seed].",
)
@click.option(
    "--batch", default=32, show_default=True, type=click.IntRange(min=1), help="Images per batch per GPU."
)
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option(
    "--format",
    "formats",
    multiple=True,
    default=["png"],
    show_default=True,
    callback=_formats,
    help="png (tree of 1000-image folders), npz (uint8 NxHxWx3 'arr_0' + 'labels'), grid. Repeatable.",
)
@click.option(
    "--grid-images",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many of the first seeds the grid shows.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", *PRECISION_DTYPES]),
    default="auto",
    show_default=True,
    help="Network compute precision; auto = bf16 on GPU, fp32 on CPU.",
)
@click.option(
    "--vae-precision",
    type=click.Choice(list(PRECISION_DTYPES)),
    default="fp32",
    show_default=True,
    help="VAE decoder precision.",
)
@click.option(
    "--vae-channels-last/--no-vae-channels-last",
    default=False,
    show_default=True,
    help="Channels-last VAE memory layout on GPUs (NCHW measured faster on an H200).",
)
@click.option(
    "--compile-vae",
    is_flag=True,
    help="torch.compile the VAE decoder for the fixed --batch shape (GPU; a minute of compilation first).",
)
@click.option(
    "--png-workers",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="PNG encoder processes per rank (0: 8 threads of the rank's own process).",
)
@fd.device_option
@fd.metrics_option("")
@fd.ref_option(required=False)
@fd.inception_option
@fd.dinov2_option
@fd.workers_option
# Long only by its 21 options, one per line: the body is the stage's steps in order (open, make, score, pack).
def main(
    generator,
    teacher_steps,
    sigmas,
    vae,
    seeds,
    classes,
    batch,
    outdir,
    formats,
    grid_images,
    precision,
    vae_precision,
    vae_channels_last,
    compile_vae,
    png_workers,
    device,
    metrics,
    ref_path,
    inception,
    dinov2,
    workers,
):
    """Generate, decode and write images for a seed list; optionally compute FID / FD_DINOv2."""
    if metrics and ref_path is None:
        raise click.UsageError("--metrics needs --ref (reference statistics, e.g. EDM2's img512.pkl)")
    if teacher_steps is not None and sigmas:
        raise click.UsageError("--few-step-sigmas applies to generators, not to --teacher-steps")
    rank, world_size, device = join_torchrun(device)
    dtype = (
        PRECISION_DTYPES["bf16" if device.type == "cuda" else "fp32"]
        if precision == "auto"
        else PRECISION_DTYPES[precision]
    )
    # Missing weights or statistics fail here, before any GPU time is spent.
    ref, detectors = fd.open_metrics(metrics, ref_path, inception, dinov2, device) if metrics else (None, {})

    outdir = Path(outdir)
    try:  # before any image is made: an output folder that cannot be created fails now
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise click.BadParameter(f"cannot create {outdir}: {err.strerror}", param_hint="'--outdir'") from None
    tree = outdir if "png" in formats else outdir / STAGING_DIR
    try:
        network_path = resolve_network_path(generator)
    except FileNotFoundError as err:
        raise click.BadParameter(str(err), param_hint="'--generator'") from None
    if rank == 0:
        click.echo(
            f"network {network_path}; {len(seeds)} seeds -> {outdir} ({', '.join(formats)}), "
            f"{world_size} process(es), {str(dtype).removeprefix('torch.')} on {device}"
        )
    net = _open_network(network_path, classes, device)
    try:
        vae_model = load_vae(
            vae, device, PRECISION_DTYPES[vae_precision], channels_last=vae_channels_last, compile=compile_vae
        )
    except OSError as err:
        raise click.BadParameter(str(err), param_hint="'--vae'") from None
    made = write_images(
        net,
        vae_model,
        seeds,
        tree,
        batch=batch,
        classes=classes,
        teacher_steps=teacher_steps,
        sigmas=sigmas,
        dtype=dtype,
        rank=rank,
        world_size=world_size,
        device=device,
        progress=rank == 0,
        png_processes=png_workers,
        pad_batches=compile_vae,
    )
    click.echo(f"rank {rank}: made {made} images (the rest existed already)")
    del net, vae_model
    barrier()

    if metrics:  # every rank reads its share of the PNGs; the statistics are summed over ranks
        paths = [png_path(tree, s) for s in seeds]
        batches = image_batches(paths, 64, rank=rank, world_size=world_size, num_workers=workers)
        total = len(paths) // world_size
        stats = fd.accumulate_stats(detectors, batches, device, progress=rank == 0, total=total)
        if rank == 0:
            results = fd.compare_to_reference(stats, ref)
            for name, value in results.items():
                click.echo(f"{name}: {value:.4f}")
            record = {**results, "num_images": len(paths), "ref": str(ref_path)}
            record |= {"generator": str(network_path), "teacher_steps": teacher_steps}
            record |= {"few_step_sigmas": sigmas, "precision": str(dtype)}
            (outdir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    # The single-writer outputs come last, so no rank waits in a collective while rank 0 writes them.
    if rank == 0 and "npz" in formats:
        click.echo(f"wrote {write_npz_from_pngs(outdir / NPZ_NAME, tree, seeds)}")
    if rank == 0 and "grid" in formats:
        click.echo(f"wrote {write_grid_from_pngs(outdir / GRID_NAME, tree, seeds[:grid_images])}")
    if rank == 0 and tree != outdir:
        shutil.rmtree(tree)
    leave_process_group()


if __name__ == "__main__":
    main()
