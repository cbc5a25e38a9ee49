"""Peak GPU memory of a SiDA run per GPU, for every ZeRO stage / checkpointing / teacher / batch choice.

    python -m sida_edm2.plan --preset edm2-img512-xxl --gpus 8 --gpu-memory 80   # table + launch command
    python -m sida_edm2.plan --preset edm2-img512-xs --gpus 1 --gpu-memory 80 --precision fp32

    from sida_edm2.plan.memory import predict_peak_bytes, recommend
    plan = predict_peak_bytes("edm2-img512-xxl", batch_gpu=16, gpus=8, zero_stage=3,
                              activation_checkpointing=True, teacher_partitioned=False)
    plan.total, plan.terms()      # bytes per GPU (the torch.cuda.max_memory_allocated it predicts), by term

The model (bytes per GPU; N = parameters of a network, W = GPUs, lp = 2 for bf16/fp16 and 4 for fp32):
- Persistent: working copies of G and the fake score (lp N, /W at ZeRO-3), fp32 master weights (4N at
  stage 0 in half precision, none in fp32 stage 0, 4N/W from stage 1), Adam m and v (8N, /W from stage
  1), the fp32 EMA of G (4N, rank 0 holds it: the peak GPU), the teacher (lp N, /W when partitioned),
  ZeRO-3 buffers (each stage-3 engine's reduce bucket, and up to stage3_max_live_parameters gathered
  parameters), and the step's noise on the GPU.
- Per update (fake-score update, generator update, in their SiDA-phase form, the largest), one at a
  time: the updated network's gradients (lp N, /W from stage 2; at stage 3 both networks' partitions
  stay allocated), its gradient buckets, and then either its forward/backward (the tensors autograd
  saves, plus workspace) or its optimizer step (an fp32 copy of its gradients, 4N at stage 0, 4N/W
  from stage 1). The peak is the largest of
  these four phases; `MemoryPlan.phase` names it.
- Saved tensors are measured, not estimated (sida_edm2.plan.activations): the replica of both updates
  runs on the meta device with the training's default speed switches (sida_edm2.model.speed); a batch-
  independent part (`saved_weight_copies`: with weight recomputation essentially the frozen fake
  score's cached weights in the generator update, below ZeRO-3) and a per-image part (`activations`).
  With activation checkpointing (blocks of all three networks): what is saved outside the blocks, plus
  the block inputs, plus the internals of the largest single block call (held while it is recomputed).
- Workspace (an assumption, not measured): WORKSPACE_FACTOR x the largest single saved activation, for
  the gradient of an activation, the gradient of its input and kernel scratch, live together in backward.
Not modelled: the CUDA context, NCCL buffers and allocator fragmentation (reserved minus allocated):
`recommend` keeps the predicted peak under `headroom` (default 90%) of the card to leave room for them.
"""

import dataclasses
import functools
import json
from pathlib import Path

import click
import torch

from sida_edm2.model.networks import Precond
from sida_edm2.model.presets import PRESETS, get_preset
from sida_edm2.plan.activations import PRECISION_BYTES, measure_activations

GIB = 2**30
WORKSPACE_FACTOR = 3
DEFAULT_HEADROOM = 0.9  # fraction of the card the predicted peak may use
DEFAULT_SATURATING_BATCH = 64  # per-GPU images beyond which a bigger micro-batch is assumed to buy no speed
_DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
# DeepSpeed 0.19.8 defaults for keys ds_configs/zero<N>.json may leave out.
_ZERO_DEFAULTS = dict(reduce_bucket_size=5e8, allreduce_bucket_size=5e8, stage3_max_live_parameters=1e9)


# ----------------------------------------------------------------------------------------------------
# The memory model.


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak allocated bytes on one GPU, by term (see the module docstring)."""

    preset: str
    batch_gpu: int
    gpus: int
    zero_stage: int
    activation_checkpointing: bool
    teacher_partitioned: bool
    precision: str
    phase: str  # where the peak falls: {fake_score,generator}_{update,step}
    params: int  # working copies of G and the fake score
    master_weights: int  # fp32 master weights of G and the fake score
    optimizer_states: int  # Adam m and v of G and the fake score
    ema: int  # fp32 EMA of G
    teacher: int
    zero3_buffers: int  # ZeRO-3 reduce buckets and gathered parameters
    step_noise: int  # z, eps, labels of one optimizer step
    gradients: int  # of the network updated in `phase` (ZeRO-3: both networks' partitions)
    comm_buckets: int  # gradient reduction buckets of the updated network
    saved_weight_copies: int  # batch-independent saved tensors (normalised weight copies)
    activations: int  # per-image saved tensors times batch_gpu
    workspace: int  # WORKSPACE_FACTOR x the largest saved activation
    step_fp32_grads: int  # the optimizer step's fp32 gradient copy (in a *_step phase only)

    TERMS = (
        "params", "master_weights", "optimizer_states", "ema", "teacher", "zero3_buffers", "step_noise",
        "gradients", "comm_buckets", "saved_weight_copies", "activations", "workspace", "step_fp32_grads",
    )  # fmt: skip

    def terms(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.TERMS}

    @property
    def total(self) -> int:
        return sum(self.terms().values())

    @property
    def model_states(self) -> int:
        """Parameters, gradients, master weights and Adam states of G and the fake score."""
        return self.params + self.gradients + self.master_weights + self.optimizer_states

    def describe(self) -> str:
        checkpointing = "on" if self.activation_checkpointing else "off"
        teacher = "partitioned" if self.teacher_partitioned else "replicated"
        return (f"ZeRO-{self.zero_stage}, activation checkpointing {checkpointing}, teacher {teacher}, "
                f"{self.batch_gpu} images/GPU, {self.precision}")  # fmt: skip


def _zero_config(stage: int) -> dict:
    with open(_DS_CONFIG_DIR / f"zero{stage}.json") as f:
        zero = json.load(f).get("zero_optimization", {})
    return {**_ZERO_DEFAULTS, "overlap_comm": stage == 3, **zero}


@functools.lru_cache(maxsize=32)
def _param_counts(network_json: str) -> tuple[int, int]:
    """(G's parameters, the fake score's = the teacher's), exact, from networks built on the meta device."""
    network = json.loads(network_json)
    with torch.device("meta"):
        G, F = Precond(**{**network, "logvar_channels": 0}), Precond(**network)
    return sum(p.numel() for p in G.parameters()), sum(p.numel() for p in F.parameters())


def predict_peak_bytes(
    preset_name: str,
    batch_gpu: int,
    gpus: int,
    zero_stage: int,
    activation_checkpointing: bool,
    teacher_partitioned: bool,
    precision: str = "bf16",
    *,
    workspace_factor: float = WORKSPACE_FACTOR,
    weight_recompute: bool | None = None,  # None: the preset's setting (as the training uses it).
    fused: bool = False,  # The fused Triton kernels (--fused): they save less for backward.
) -> MemoryPlan:
    """The predicted peak of torch.cuda.max_memory_allocated on the busiest GPU (rank 0) of a run."""
    # One function on purpose: the memory model reads top to bottom as its list of terms, which share
    # the sharding rule and the sizes defined first.
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision must be one of {list(PRECISION_BYTES)}, got {precision!r}")
    if precision == "fp16" and zero_stage == 0:
        raise ValueError("fp16 needs ZeRO stage >= 1 (the training refuses fp16 at stage 0)")
    cfg = get_preset(preset_name)
    network, lp, W, stage = cfg["network"], PRECISION_BYTES[precision], gpus, zero_stage
    n_g, n_f = _param_counts(json.dumps(network, sort_keys=True))
    zero = _zero_config(stage)

    def sharded(n: float, from_stage: int) -> float:
        return n / W if stage >= from_stage else n

    has_master = not (stage == 0 and precision == "fp32")  # fp32 stage 0: the parameters are the master
    # ZeRO-3 keeps up to stage3_max_live_parameters gathered (the networks run one after the other, and
    # n_f >= n_g is also the teacher's size); each ZeRO-3 engine (G, fake score) has a reduce bucket.
    gathered = lp * min(zero["stage3_max_live_parameters"], n_f)
    reduce_buckets = 2 * lp * zero["reduce_bucket_size"] if stage == 3 else 0
    step_images = -(-cfg["batch"] // gpus)  # one optimizer step's images per GPU
    C, R, labels = network["img_channels"], network["img_resolution"], network["label_dim"]
    persistent = dict(
        params=lp * sharded(n_g + n_f, 3),
        master_weights=4 * sharded(n_g + n_f, 1) if has_master else 0,
        optimizer_states=8 * sharded(n_g + n_f, 1),
        ema=4 * sharded(n_g, 1) if stage in (1, 2) else 4 * n_g,  # flat partitions (flat_master)
        teacher=lp * n_f / (W if teacher_partitioned else 1),
        zero3_buffers=reduce_buckets + (gathered if stage == 3 or teacher_partitioned else 0),
        step_noise=4 * step_images * (2 * C * R * R + labels + 1),
    )
    # ZeRO-3 partitioned weights are never cached (sida_edm2.model.speed).
    if weight_recompute is None:
        weight_recompute = cfg.get("weight_recompute", True)
    activations = measure_activations(network, precision, stage < 3, weight_recompute, fused)
    candidates = []
    for update, n in (("fake_score", n_f), ("generator", n_g)):
        gradients = lp * (n_g + n_f) / W if stage == 3 else lp * sharded(n, 2)
        if stage == 0:
            comm = lp * min(n, zero["allreduce_bucket_size"]) if W > 1 else 0
        else:
            comm = 0 if stage == 3 else lp * zero["reduce_bucket_size"] * (2 if zero["overlap_comm"] else 1)
        acts = activations[f"{update}_update"]
        saved = acts.at(batch_gpu, activation_checkpointing)
        common = dict(gradients=gradients, comm_buckets=comm)
        candidates.append((f"{update}_update", dict(
            common, saved_weight_copies=saved.fixed, activations=saved.per_image * batch_gpu,
            workspace=workspace_factor * acts.largest_activation_per_image * batch_gpu, step_fp32_grads=0,
        )))  # fmt: skip
        candidates.append((f"{update}_step", dict(
            common, saved_weight_copies=0, activations=0, workspace=0,
            step_fp32_grads=4 * sharded(n, 1) if has_master else 0,
        )))  # fmt: skip
    phase, transient = max(candidates, key=lambda c: sum(c[1].values()))
    terms = {name: round(value) for name, value in {**persistent, **transient}.items()}
    return MemoryPlan(
        preset=preset_name, batch_gpu=batch_gpu, gpus=gpus, zero_stage=zero_stage,
        activation_checkpointing=activation_checkpointing, teacher_partitioned=teacher_partitioned,
        precision=precision, phase=phase, **terms,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Choosing a configuration.


class NothingFitsError(ValueError):
    """No configuration of the grid is predicted to fit the memory budget."""


def batch_choices(preset_name: str, gpus: int) -> list[int]:
    """Per-GPU micro-batches to consider: powers of two up to batch/gpus that divide batch/gpus (so that
    batch = batch_gpu * gpus * accumulation rounds holds exactly)."""
    batch = get_preset(preset_name)["batch"]
    choices = [1 << k for k in range(batch.bit_length()) if batch % ((1 << k) * gpus) == 0]
    if not choices:
        raise ValueError(f"the preset's batch {batch} is not a multiple of {gpus} GPUs")
    return choices


def candidate_plans(preset_name: str, gpus: int, precision: str = "bf16") -> list[MemoryPlan]:
    """Predictions for every ZeRO stage x checkpointing x teacher placement x per-GPU batch."""
    # ZeRO stage 0 trains in fp32 only (engines.build_ds_config): its half-precision optimizer wrapper
    # keeps master weights that forced weight normalisation cannot reach.
    stages = (0, 1, 2, 3) if precision == "fp32" else (1, 2, 3)
    return [
        predict_peak_bytes(preset_name, batch_gpu, gpus, stage, checkpointing, partitioned, precision)
        for stage in stages
        for checkpointing in (False, True)
        for partitioned in (False, True)
        for batch_gpu in batch_choices(preset_name, gpus)
    ]


def _speed_rank(plan: MemoryPlan, saturating_batch: int) -> tuple:
    """Smaller is faster-looking: more images per GPU (up to saturating_batch), then no recomputation,
    then less sharding of G and the fake score, then a replicated teacher, then the larger batch."""
    return (-min(plan.batch_gpu, saturating_batch), plan.activation_checkpointing, plan.zero_stage,
            plan.teacher_partitioned, -plan.batch_gpu)  # fmt: skip


def recommend(
    preset_name: str,
    gpus: int,
    gpu_memory_gib: float,
    precision: str = "bf16",
    headroom: float = DEFAULT_HEADROOM,
    saturating_batch: int = DEFAULT_SATURATING_BATCH,
    plans: list[MemoryPlan] | None = None,
) -> MemoryPlan:
    """The fastest-looking configuration whose predicted peak fits headroom * gpu_memory_gib GiB.
    Raises NothingFitsError (with the smallest configuration's prediction) when none does."""
    plans = plans if plans is not None else candidate_plans(preset_name, gpus, precision)
    budget = headroom * gpu_memory_gib * GIB
    fitting = [plan for plan in plans if plan.total <= budget]
    if not fitting:
        smallest = min(plans, key=lambda plan: plan.total)
        raise NothingFitsError(
            f"no configuration of {preset_name} fits {budget / GIB:.1f} GiB per GPU ({headroom:.0%} of "
            f"{gpu_memory_gib:g} GiB) on {gpus} GPU(s): the smallest predicted peak is "
            f"{smallest.total / GIB:.1f} GiB ({smallest.describe()}); use more GPUs or more GPU memory"
        )
    return min(fitting, key=lambda plan: _speed_rank(plan, saturating_batch))


def format_table(plans: list[MemoryPlan], budget_bytes: float) -> str:
    """Predicted peak GiB per GPU: one row per (stage, checkpointing, teacher), one column per batch."""
    batches = sorted({plan.batch_gpu for plan in plans})
    rows = {}
    for plan in plans:
        key = (plan.zero_stage, plan.activation_checkpointing, plan.teacher_partitioned)
        mark = "*" if plan.total > budget_bytes else " "
        rows.setdefault(key, {})[plan.batch_gpu] = f"{plan.total / GIB:6.1f}{mark}"
    lines = [f"{'ZeRO ckpt teacher':<20}|" + "".join(f"{b:>8}" for b in batches)]
    for (stage, ckpt, partitioned), cells in rows.items():
        label = f"{stage:>4} {'on' if ckpt else 'off':>4} {'part.' if partitioned else 'repl.':>7}   |"
        lines.append(label + "".join(f"{cells.get(b, ''):>8}" for b in batches))
    return "\n".join(lines)


def format_terms(plan: MemoryPlan) -> str:
    return "\n".join(f"  {name:<20} {value / GIB:8.2f} GiB" for name, value in plan.terms().items()) + (
        f"\n  {'total':<20} {plan.total / GIB:8.2f} GiB   (peak phase: {plan.phase})"
    )


def launch_command(plan: MemoryPlan, gpus: int) -> str:
    """The train_edm2.py command of `plan` (SiDA; the teacher, data and run directory are placeholders)."""
    launcher = f"deepspeed --num_gpus {gpus} train_edm2.py" if gpus > 1 else "python train_edm2.py"
    flags = [
        f"--preset {plan.preset} --method sida --teacher TEACHER.pkl --data LATENTS --run-dir RUN_DIR",
        f"--zero-stage {plan.zero_stage} --batch-gpu {plan.batch_gpu}",
        f"--precision {plan.precision}",
        "--activation-checkpointing" if plan.activation_checkpointing else "",
        "--teacher-zero3" if plan.teacher_partitioned else "",
    ]
    return " ".join([launcher, *(flag for flag in flags if flag)])


@click.command(context_settings={"show_default": True})
@click.option(
    "--preset", required=True, type=click.Choice(sorted(PRESETS)), help="Network and batch preset of the run."
)
@click.option("--gpus", type=click.IntRange(min=1), default=1, help="Data-parallel GPUs of the run.")
@click.option(
    "--gpu-memory", type=click.FloatRange(min=0, min_open=True), default=80.0, help="Memory of one GPU, GiB."
)
@click.option(
    "--precision",
    type=click.Choice(sorted(PRECISION_BYTES)),
    default="bf16",
    help="Training precision (ZeRO stage 0 is considered for fp32 only).",
)
@click.option(
    "--headroom",
    type=click.FloatRange(0, 1, min_open=True),
    default=DEFAULT_HEADROOM,
    help="Fraction of --gpu-memory the predicted peak may use (the rest: CUDA context, NCCL, fragmentation).",
)
@click.option(
    "--saturating-batch",
    type=click.IntRange(min=1),
    default=DEFAULT_SATURATING_BATCH,
    help="Images per GPU beyond which less recomputation or sharding is preferred over a bigger batch.",
)
def main(preset: str, gpus: int, gpu_memory: float, precision: str, headroom: float, saturating_batch: int):
    """Predict the peak GPU memory per GPU of a SiDA run for every ZeRO stage, activation checkpointing,
    teacher placement and per-GPU batch, and print the train_edm2.py command of the fastest-looking
    configuration that fits."""
    try:
        plans = candidate_plans(preset, gpus, precision)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--gpus'") from None
    budget = headroom * gpu_memory * GIB
    click.echo(f"{preset} on {gpus} GPU(s), {precision}: predicted peak allocated GiB per GPU")
    click.echo(
        "rows: ZeRO stage, activation checkpointing (on/off), teacher replicated or partitioned "
        "(--teacher-zero3); columns: images per GPU (--batch-gpu)"
    )
    click.echo(f"(* = over the budget of {budget / GIB:.1f} GiB, {headroom:.0%} of {gpu_memory:g} GiB)")
    click.echo(format_table(plans, budget))
    try:
        best = recommend(preset, gpus, gpu_memory, precision, headroom, saturating_batch, plans=plans)
    except NothingFitsError as err:
        raise click.ClickException(str(err)) from None
    accum = get_preset(preset)["batch"] // (best.batch_gpu * gpus)
    click.echo(f"\nrecommended: {best.describe()} ({accum} accumulation rounds)\n{format_terms(best)}")
    click.echo(
        f"\nlaunch command (replace TEACHER.pkl, LATENTS and RUN_DIR):\n  {launch_command(best, gpus)}"
    )
