"""The resolved configuration of one distillation run: preset defaults, then command-line overrides.

    cfg = resolve_config("tiny", method="sida", teacher="t.safetensors", data="latents", run_dir="runs/a")
    rounds = cfg.accumulation_rounds(world_size)     # clear ConfigError unless batch % (batch_gpu*world) == 0
    print(json.dumps(cfg.to_dict(), indent=1))       # what `train_edm2.py --dry-run` prints

Only what a user chooses lives here; everything derived (accumulation rounds, DeepSpeed micro-batch
sizes, the compute dtype) is computed from it, so a rerun of the same command resumes the same run.
"""

import dataclasses
import json
import math
import os
from pathlib import Path

from sida_edm2.model.presets import get_preset
from sida_edm2.train.losses import DISTILLATION_METHODS

# The distillation methods, plus "edm2": training an EDM2 teacher from scratch with EDM2's loss (the
# fake-score loss on real data), for the demo and the toy reproduction, where no official teacher exists.
TRAIN_METHODS = (*DISTILLATION_METHODS, "edm2")
# EDM2's own Adam settings, the defaults of method "edm2" (the presets hold SiDA's).
EDM2_ADAM = {"adam_betas": (0.9, 0.99), "adam_eps": 1e-8}
PRECISION_CHOICES = ("auto", "bf16", "fp16", "fp32")
ZERO_STAGES = (0, 1, 2, 3)

# Preset keys that become TrainConfig fields of the same name when the command line leaves them unset
# (with adam_betas and adam_eps, converted below).
_PRESET_FIELDS = (
    "batch",
    "batch_gpu",
    "lr",
    "lambda_sid",
    "lambda_adv_theta",
    "lambda_adv_psi",
    "alpha",
    "ema_mimg",
    "sigma_init",
    "tmax",
    "fake_only_kimg",
    "sid_only_kimg",
    "force_norm",
    "weight_recompute",
)

# Fields a resumed run must share with the checkpoint: they fix the DeepSpeed checkpoint layout, the
# networks or the meaning of the counters, so a change cannot continue the same run.
RESUME_MUST_MATCH = ("preset", "method", "batch", "batch_gpu", "world_size", "zero_stage", "precision")


class ConfigError(ValueError):
    """A user-facing configuration problem (the CLI prints the message without a traceback)."""


# Fields without a default come from the preset (resolve_config): SiDA's defaults live only there.
@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    preset: str  # Name in sida_edm2.model.presets.PRESETS: network architecture and default hyper-parameters.
    run_dir: str  # Output directory; rerunning with the same run_dir resumes from its last checkpoint.
    teacher: str | None = None  # EDM2 .pkl or export (.safetensors + .json) of the teacher.
    method: str = "sida"  # "sid" (data-free), "sida", "sid2a" (SiDA from a SiD generator) or "edm2".
    init_generator: str | None = None  # Generator to start from (.pkl or export); required for sid2a.
    data: str | None = None  # Latent shard directory (encode_dataset.py output); required for sida/sid2a.
    batch: int  # Images per optimizer step over all GPUs.
    batch_gpu: int  # Images per GPU per micro-batch (accumulation covers the rest).
    zero_stage: int = (
        2  # DeepSpeed ZeRO stage (0-3) of G and the fake score; selects ds_configs/zero<N>.json.
    )
    ds_config: str | None = None  # Own DeepSpeed JSON instead of ds_configs/zero<stage>.json.
    precision: str = "auto"  # "bf16", "fp16" (dynamic loss scaling), "fp32"; auto: bf16 on GPU, fp32 on CPU.
    alpha: float  # SiD's alpha.
    lambda_sid: float  # Weight of the SiD generator term.
    lambda_adv_theta: float  # Weight of the adversarial generator term.
    lambda_adv_psi: float  # Weight of the discriminator loss in the fake-score update.
    fake_only_kimg: float  # SiDA/SiD2A: generator kimg during which only the fake score trains.
    sid_only_kimg: float  # Generator kimg up to which G trains on the SiD term alone.
    tmax: float  # Generator-update noise: t ~ U(0, tmax).
    sigma_init: float  # The generator's fixed input noise level.
    lr: float  # Adam learning rate of G and the fake score.
    adam_betas: tuple[float, float]  # Adam betas (Table 7).
    adam_eps: float  # Adam epsilon (Table 7).
    ema_mimg: float  # EMA half-life of G in Mimg (ramp-up ratio 0.05).
    max_kimg: float = 100_000.0  # Stop after this many generator kimg.
    checkpoint_kimg: float = 500.0  # Checkpoint + export interval.
    tick_kimg: float = 50.0  # Progress-line / stats interval.
    grid_kimg: float | None = None  # Sample-grid interval (None: every checkpoint).
    seed: int = 0  # Seeds the networks' noise, the data order and the generator's noise.
    force_norm: bool  # Forced weight normalisation of the master weights after each step.
    activation_checkpointing: bool = False  # Recompute each UNet block in backward to save memory.
    teacher_zero3: bool = False  # Partition the frozen teacher with a ZeRO-3 inference engine.
    # Speed switches (sida_edm2.model.speed); none changes the results beyond float rounding.
    weight_cache: bool = True  # Teacher weights baked; the frozen fake score's cached in the G update.
    weight_recompute: bool  # Recompute MPConv weights in backward instead of keeping copies.
    # The three below won on an H200 together (benchmarks/RESULTS.md, issue 16); each acts on GPUs only.
    channels_last: bool = True  # Run the UNets on channels-last activations.
    compile: bool = False  # torch.compile every UNet block of the three networks.
    fused: bool = True  # MP elementwise chains as fused Triton kernels (eager on CPU).
    fused_adam: bool = True  # torch's fused (single-kernel) Adam over DeepSpeed's flat partitions.
    keep_checkpoints: int = 3  # Checkpoints kept on disk (the newest K).
    num_workers: int = 2  # Latent-reader worker processes per rank.
    vae: str | None = None  # SD-VAE (hub id or dir) to decode sample grids; None: show latent channels.

    def accumulation_rounds(self, world_size: int) -> int:
        """R = batch / (batch_gpu * world_size), or a clear ConfigError when it is not a whole number."""
        per_round = self.batch_gpu * world_size
        if self.batch_gpu < 1 or self.batch % per_round != 0:
            raise ConfigError(
                f"--batch {self.batch} is not divisible by --batch-gpu {self.batch_gpu} x world size "
                f"{world_size} = {per_round}; choose a batch that is a multiple of {per_round}"
            )
        return self.batch // per_round

    def resolved_precision(self, has_cuda: bool) -> str:
        """The precision actually used: auto means bf16 on GPU and fp32 on CPU."""
        if self.precision == "auto":
            return "bf16" if has_cuda else "fp32"
        if self.precision == "fp16" and not has_cuda:
            raise ConfigError("--precision fp16 needs a GPU; use fp32 (or bf16) on CPU")
        return self.precision

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def resolve_config(preset: str, run_dir: str, external_data: bool = False, **overrides) -> TrainConfig:
    """TrainConfig from the preset's defaults, overridden by every keyword that is not None.

    external_data: the caller feeds real batches itself (`Trainer(cfg, data_iter=...)`, benchmarks), so
    sida/sid2a need no --data.
    """
    try:
        values = get_preset(preset)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown TrainConfig fields: {sorted(unknown)}")
    fields = {name: values[name] for name in _PRESET_FIELDS}
    fields["adam_betas"] = tuple(float(b) for b in values["adam_betas"])
    fields["adam_eps"] = float(values["adam_eps"])
    if overrides.get("method") == "edm2":
        fields.update(EDM2_ADAM)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(preset=preset, run_dir=str(run_dir), **fields)
    validate(cfg, external_data)
    return cfg


def validate(cfg: TrainConfig, external_data: bool = False) -> None:
    """Checks that need no files besides the run directory; file checks happen when they are opened."""
    if cfg.method not in TRAIN_METHODS:
        raise ConfigError(f"--method must be one of {TRAIN_METHODS}, got {cfg.method!r}")
    if cfg.precision not in PRECISION_CHOICES:
        raise ConfigError(f"--precision must be one of {PRECISION_CHOICES}, got {cfg.precision!r}")
    if cfg.zero_stage not in ZERO_STAGES:
        raise ConfigError(f"--zero-stage must be one of {ZERO_STAGES}, got {cfg.zero_stage}")
    if cfg.method == "sid2a" and not cfg.init_generator:
        raise ConfigError("--method sid2a starts from a SiD generator: pass --init-generator <export|pkl>")
    if cfg.method != "sid" and not cfg.data and not external_data:
        raise ConfigError(f"--method {cfg.method} trains on real latents: pass --data <shards>")
    if cfg.method == "edm2":
        if cfg.teacher or cfg.init_generator:
            raise ConfigError("--method edm2 trains a teacher from scratch: no --teacher / --init-generator")
    elif not cfg.teacher:
        raise ConfigError("--teacher is required (an EDM2 .pkl or an export .safetensors)")
    for name in ("batch", "batch_gpu", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_kimg", "checkpoint_kimg", "tick_kimg", "lr", "ema_mimg"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    floats = [f.name for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), float)]
    for name in floats:  # nan passes every comparison below, inf would never finish
        if not math.isfinite(getattr(cfg, name)):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(cfg, name)}")
    for name in ("lambda_sid", "lambda_adv_theta", "lambda_adv_psi", "fake_only_kimg", "sid_only_kimg"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.sigma_init <= 0:
        raise ConfigError(f"--sigma-init must be > 0, got {cfg.sigma_init}")
    if cfg.grid_kimg is not None and cfg.grid_kimg <= 0:
        raise ConfigError(f"--grid-kimg must be > 0, got {cfg.grid_kimg}")
    if cfg.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {cfg.num_workers}")
    if not 0 < cfg.tmax <= 1:
        raise ConfigError(f"--tmax must lie in (0, 1], got {cfg.tmax}")


def check_inputs_exist(cfg: TrainConfig) -> None:
    """Clear errors for a missing teacher, generator or dataset and an unwritable run directory."""
    for flag, path in (("--teacher", cfg.teacher), ("--init-generator", cfg.init_generator)):
        if path and not Path(path).exists():
            raise ConfigError(f"{flag} {path} does not exist")
    if cfg.data:
        if not (Path(cfg.data) / "manifest.json").is_file():
            raise ConfigError(
                f"--data {cfg.data} is not a latent dataset (no manifest.json); run encode_dataset.py"
            )
    if cfg.vae:
        from latent.vae import vae_reference_problem

        problem = vae_reference_problem(cfg.vae)
        if problem:
            raise ConfigError(f"--vae: {problem}")
    run_dir = Path(cfg.run_dir)
    probe = run_dir if run_dir.exists() else next((p for p in run_dir.parents if p.exists()), Path("."))
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--run-dir {cfg.run_dir} is not writable ({probe} is not a writable directory)")
