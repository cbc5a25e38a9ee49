"""Distil an EDM2 teacher into a one-step generator with SiD, SiDA or SiD²A, under DeepSpeed.

Rerunning the same command resumes from the run directory's last checkpoint.

One process on the CPU (fp32; tiny presets, tests, the demo):

    python train_edm2.py --preset tiny --method sida --teacher teacher.safetensors --data latents \\
        --run-dir runs/tiny --max-kimg 0.1

8 GPUs with the DeepSpeed launcher (bf16, ZeRO-2 from ds_configs/zero2.json; torchrun works the same way):

    deepspeed --num_gpus 8 train_edm2.py --preset edm2-img512-xs --method sida \\
        --teacher edm2-img512-xs-2147483-0.135.pkl --data latents/img512 --run-dir runs/xs-sida
    torchrun --nproc_per_node 8 train_edm2.py ...same flags...

SiD²A starts G from a SiD generator (an export or a SiD .pkl):

    deepspeed --num_gpus 8 train_edm2.py --preset edm2-img512-xs --method sid2a \\
        --init-generator runs/xs-sid/export-latest.safetensors \\
        --teacher ... --data ... --run-dir runs/xs-sid2a

Without an official teacher (the demo, the toy reproduction), train one first with EDM2's loss:

    python train_edm2.py --preset demo --method edm2 --data latents --run-dir runs/teacher --lr 0.01 \\
        --max-kimg 20
    ... --method sida --teacher runs/teacher/export-latest.safetensors ...

`--dry-run` prints the resolved configuration as JSON and exits. Outputs: <run-dir>/log.txt,
stats.jsonl, tensorboard/, grids/, checkpoints/, export-<kimg>.safetensors and export-latest.safetensors
(+ .json), the EMA generator that decode_samples.py reads.
"""

import json
import sys

import click
import torch

from sida_edm2.model.presets import PRESETS
from sida_edm2.train.config import (
    TRAIN_METHODS,
    ConfigError,
    TrainConfig,
    check_inputs_exist,
    resolve_config,
)
from sida_edm2.train.engines import build_ds_config, load_ds_config, world_size_from_env


def _float_option(name: str, help: str):
    return click.option(name, type=float, default=None, help=help + " [default: preset]")


def _default(field: str):
    """TrainConfig's default for a flag that the presets do not set (one source for CLI and Python)."""
    return TrainConfig.__dataclass_fields__[field].default


@click.command(context_settings={"show_default": True})
@click.option(
    "--preset",
    required=True,
    type=click.Choice(list(PRESETS)),
    help="Network and hyper-parameter preset (sida_edm2/model/presets.py); tiny and demo are for CPU runs.",
)
@click.option(
    "--method",
    type=click.Choice(TRAIN_METHODS),
    default=_default("method"),
    help="Distillation method, or edm2: train a teacher with EDM2's loss.",
)
@click.option("--teacher", help="EDM2 .pkl or export .safetensors of the teacher.")
@click.option("--init-generator", help="Generator to start from (SiD export or .pkl); required for sid2a.")
@click.option("--data", help="Latent shard directory (encode_dataset.py); required for sida and sid2a.")
@click.option("--run-dir", required=True, help="Output directory; rerun with the same one to resume.")
@click.option(
    "--batch", type=int, default=None, help="Images per optimizer step, all GPUs. [default: preset]"
)
@click.option("--batch-gpu", type=int, default=None, help="Images per GPU per micro-batch. [default: preset]")
@click.option(
    "--zero-stage",
    type=click.IntRange(0, 3),
    default=_default("zero_stage"),
    help="ZeRO stage (ds_configs/zero<N>.json).",
)
@click.option("--ds-config", help="Own DeepSpeed JSON (ZeRO/fp16 settings only; batch sizes are derived).")
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
    default=_default("precision"),
    help="auto: bf16 on GPU, fp32 on CPU; fp16 uses dynamic loss scaling.",
)
@_float_option("--alpha", "SiD alpha.")
@_float_option("--lambda-sid", "Weight of the SiD generator term.")
@_float_option("--lambda-adv-theta", "Weight of the adversarial generator term.")
@_float_option("--lambda-adv-psi", "Weight of the discriminator loss.")
@_float_option(
    "--fake-only-kimg", "SiDA/SiD2A: generator kimg of fake-score-only training (sid trains G at once)."
)
@_float_option("--sid-only-kimg", "SiDA/SiD2A: generator kimg up to which G trains on the SiD term alone.")
@_float_option("--tmax", "Generator-update noise t ~ U(0, tmax).")
@_float_option("--sigma-init", "The generator's input noise level.")
@_float_option("--lr", "Adam learning rate of G and the fake score.")
@_float_option("--ema-mimg", "EMA half-life in Mimg.")
@click.option(
    "--max-kimg", type=float, default=_default("max_kimg"), help="Training length in generator kimg."
)
@click.option(
    "--checkpoint-kimg", type=float, default=_default("checkpoint_kimg"), help="Checkpoint + export interval."
)
@click.option("--tick-kimg", type=float, default=_default("tick_kimg"), help="Progress-line interval.")
@click.option(
    "--grid-kimg", type=float, default=None, help="Sample-grid interval. [default: checkpoint-kimg]"
)
@click.option("--seed", type=int, default=_default("seed"), help="Random seed.")
@click.option(
    "--force-norm/--no-force-norm", default=None, help="Forced weight normalisation. [default: preset]"
)
@click.option(
    "--activation-checkpointing", is_flag=True, help="Recompute UNet blocks in backward (saves memory)."
)
@click.option(
    "--teacher-zero3", is_flag=True, help="Partition the teacher with ZeRO-3 instead of replicating it."
)
@click.option(
    "--weight-cache/--no-weight-cache",
    default=_default("weight_cache"),
    help="Bake the teacher's weights; cache the frozen fake score's in the generator update.",
)
@click.option(
    "--weight-recompute/--no-weight-recompute",
    default=None,
    help="Recompute normalised weights in backward instead of keeping copies (saves memory, costs speed). "
    "[default: preset]",
)
@click.option(
    "--channels-last/--no-channels-last",
    default=_default("channels_last"),
    help="Run the UNets on channels-last activations (on a GPU).",
)
@click.option("--compile", is_flag=True, help="torch.compile every UNet block (slow first iterations).")
@click.option(
    "--fused/--no-fused",
    default=_default("fused"),
    help="Run the magnitude-preserving elementwise chains as fused Triton kernels (on a GPU; eager on CPU).",
)
@click.option(
    "--fused-adam/--no-fused-adam",
    default=_default("fused_adam"),
    help="torch's fused Adam kernel (on a GPU).",
)
@click.option(
    "--keep-checkpoints", type=int, default=_default("keep_checkpoints"), help="Checkpoints kept on disk."
)
@click.option(
    "--num-workers", type=int, default=_default("num_workers"), help="Latent-reader worker processes per GPU."
)
@click.option("--vae", help="SD-VAE (hub id or directory) to decode sample grids.")
@click.option("--dry-run", is_flag=True, help="Print the resolved configuration as JSON and exit.")
# The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True)
def main(dry_run: bool, local_rank: int | None, **options) -> None:
    """Distil an EDM2 teacher into a one-step generator (SiD, SiDA, SiD²A), or train a teacher (edm2)."""
    try:
        cfg = resolve_config(**options)
        world_size = world_size_from_env()
        rounds = cfg.accumulation_rounds(world_size)
        precision = cfg.resolved_precision(torch.cuda.is_available())
        ds_config = build_ds_config(
            load_ds_config(cfg.zero_stage, cfg.ds_config),
            batch_gpu=cfg.batch_gpu,
            rounds=rounds,
            world_size=world_size,
            precision=precision,
        )
        check_inputs_exist(cfg)
    except ConfigError as err:
        raise click.UsageError(str(err)) from None
    if dry_run:
        resolved = {
            **cfg.to_dict(),
            "world_size": world_size,
            "accumulation_rounds": rounds,
            "resolved_precision": precision,
            "deepspeed": ds_config,
        }
        click.echo(json.dumps(resolved, indent=1))
        return
    from latent.reader import UnreadableDataError
    from sida_edm2.sample.torchrun_env import leave_process_group
    from sida_edm2.train.trainer import train

    try:
        train(cfg)
    except (ConfigError, UnreadableDataError) as err:
        click.echo(f"Error: {err}", err=True)
        leave_process_group(failed=True)
        sys.exit(2)
    leave_process_group()


if __name__ == "__main__":
    main()
