"""Encode images into SD-VAE latent shards (webdataset tars + manifest.json) for EDM2 distillation.

    python encode_dataset.py --source /data/imagenet/train --dest data/img512-latents
    python encode_dataset.py --source ILSVRC2012_img_train.tar --dest data/img512-latents --flip
    python encode_dataset.py --source img512-sd.zip --dest data/img512-latents        # EDM2 latents, no VAE
    torchrun --nproc_per_node 8 encode_dataset.py --source /data/imagenet/train --dest data/img512-latents
    python encode_dataset.py --dest data/img512-latents --verify                      # check only

Rerun the same command after a crash or kill to finish the job: completed shards are kept, partial ones
redone, and every source image ends up in the dataset exactly once. See latent/FORMAT.md.
"""

import logging

import click

from latent.encode_job import EncodeOptions, init_distributed_if_launched, run_encode
from latent.encode_plan import EncodeError
from latent.vae import DEFAULT_VAE
from latent.verify import verify_dataset
from preprocess.containers import SourceError
from sida_edm2.cli_types import DeviceType
from sida_edm2.sample.torchrun_env import leave_process_group


@click.command()
@click.option(
    "--source", help="ImageNet train folder, image folder, .zip or .tar of one, or EDM2 img512-sd.zip."
)
@click.option("--dest", required=True, help="Output directory of shards and manifest.json.")
@click.option(
    "--vae", default=DEFAULT_VAE, show_default=True, help="Hub id or local AutoencoderKL directory."
)
@click.option(
    "--resolution", default=512, show_default=True, type=click.IntRange(8), help="Crop size in pixels."
)
@click.option(
    "--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Images per VAE call."
)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(0),
    help="Image-decoding processes per rank [default: the cores per rank minus one, at most 16].",
)
@click.option(
    "--shard-size", default=1000, show_default=True, type=click.IntRange(1), help="Images per shard."
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="VAE compute precision (bfloat16: GPU only).",
)
@click.option(
    "--storage-dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Precision of the stored moments (float16 halves the size; error in the manifest).",
)
@click.option(
    "--flip/--no-flip",
    default=False,
    show_default=True,
    help="Also store the moments of the horizontally flipped image.",
)
@click.option(
    "--limit", type=click.IntRange(1), default=None, help="Encode only N images, spread over the source."
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    type=DeviceType(allow_auto=True),
    help="auto (cuda if available), cpu, cuda, cuda:1...",
)
@click.option(
    "--channels-last/--no-channels-last",
    default=False,
    show_default=True,
    help="Channels-last VAE memory layout on GPUs (NCHW measured faster on an H200).",
)
@click.option(
    "--compile",
    "compile_vae",
    is_flag=True,
    help="torch.compile the VAE encoder for the fixed batch shape (GPU; a minute of compilation first).",
)
@click.option("--verify", is_flag=True, help="Re-read all shards and check them against the manifest.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def main(
    source,
    dest,
    vae,
    resolution,
    batch_size,
    workers,
    shard_size,
    dtype,
    storage_dtype,
    flip,
    limit,
    device,
    channels_last,
    compile_vae,
    verify,
    progress,
):
    """Encode --source into latent shards in --dest (or, with only --dest and --verify, check them)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if source is None and not verify:
        raise click.UsageError("--source is required (only --verify can run without it)")
    if source is not None:
        options = EncodeOptions(
            source=source,
            dest=dest,
            vae=vae,
            resolution=resolution,
            batch_size=batch_size,
            workers=workers,
            shard_size=shard_size,
            dtype=dtype,
            storage_dtype=storage_dtype,
            flip=flip,
            limit=limit,
            device=device,
            progress=progress,
            channels_last=channels_last,
            compile=compile_vae,
        )
        init_distributed_if_launched()
        try:
            manifest = run_encode(options)
        except SourceError as exn:
            raise click.UsageError(str(exn)) from None
        except EncodeError as exn:
            raise click.ClickException(str(exn)) from None
        leave_process_group()
        if manifest is None:  # not rank 0: the manifest and the verification are rank 0's
            return
        click.echo(
            f"{dest}: {manifest['num_samples']} samples, {manifest['num_skipped']} skipped, "
            f"{manifest['num_upscaled']} upscaled, {len(manifest['shards'])} shards"
        )
    if verify:
        try:
            problems = verify_dataset(dest)
        except (FileNotFoundError, ValueError) as exn:
            raise click.ClickException(str(exn)) from None
        if problems:
            shown = "\n  ".join(problems[:20])
            raise click.ClickException(f"{dest}: {len(problems)} problem(s):\n  {shown}")
        click.echo(f"{dest}: verified, every shard matches manifest.json")


if __name__ == "__main__":
    main()
