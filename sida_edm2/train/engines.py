"""DeepSpeed plumbing of the distillation loop: process group, configs, the two engines, the teacher.

    ds = import_deepspeed()                      # CPU: DS_ACCELERATOR=cpu, no shared-memory comm JIT
    dist_env = init_deepspeed_distributed()      # works under deepspeed/torchrun or as one plain process
    ds_cfg = build_ds_config(load_ds_config(2), batch_gpu=4, rounds=2, world_size=2, precision="bf16")
    engine_g = make_engine(G, ds_cfg, lr=5e-5, betas=(0.0, 0.999), eps=1e-6)
    engine_g, engine_f, masters = build_engines(G, F, ds_cfg, adam, force_norm=True, check_grads=False)

G and the fake score each get their own `deepspeed.initialize` with a client `torch.optim.Adam` (plain
Adam, not AdamW; nothing is JIT-compiled). Micro-batch, accumulation and world size are always set here
from the run's configuration; the JSON files in ds_configs/ hold only the rest (ZeRO settings, the fp16
loss-scaler settings). docs/ARCHITECTURE.md ("DeepSpeed and the ZeRO layouts", "Known traps") gives the
facts they rest on.
"""

import copy
import dataclasses
import functools
import json
import os
import socket
from pathlib import Path

import torch
import torch.utils.checkpoint

from sida_edm2.model.networks import PRECISION_DTYPES
from sida_edm2.train.config import ConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
# Keys the run derives from --batch, --batch-gpu, the world size and --precision; a JSON may not set them.
DERIVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def import_deepspeed():
    """deepspeed, imported so that CPU machines use the CPU accelerator and plain gloo.

    Without the override every `deepspeed.initialize` on CPU JIT-compiles a shared-memory comm op
    (60-190 s, needs ninja); gloo alone is what the tests and CPU runs need.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_deepspeed_distributed() -> DistEnv:
    """Initialise (once) the process group DeepSpeed uses; works with or without a launcher.

    A plain `python train_edm2.py ...` gets single-process defaults for the variables a launcher sets;
    without them DeepSpeed would go looking for MPI. A single process takes a free port, not a fixed
    default, so that two such runs (or one beside a launched job) do not collide on the rendezvous port.
    """
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ and os.environ["WORLD_SIZE"] == "1":
        os.environ["MASTER_PORT"] = str(_free_port())
    os.environ.setdefault("MASTER_PORT", "29500")
    deepspeed = import_deepspeed()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False, verbose=False
        )
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistEnv(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def world_size_from_env() -> int:
    """The world size a launcher announced (1 without one): needed before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_ds_config(zero_stage: int, path: str | None = None) -> dict:
    """The JSON of ds_configs/zero<stage>.json, or of `path`; its ZeRO stage must agree with zero_stage."""
    path = Path(path) if path else DS_CONFIG_DIR / f"zero{zero_stage}.json"
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} not found")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"DeepSpeed config {path} cannot be read as JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"DeepSpeed config {path} is not a JSON object")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage != zero_stage:
        raise ConfigError(f"{path} sets ZeRO stage {stage} but --zero-stage is {zero_stage}")
    return cfg


def build_ds_config(base: dict, *, batch_gpu: int, rounds: int, world_size: int, precision: str) -> dict:
    """The full DeepSpeed config: `base` plus the derived batch sizes and the precision switches."""
    derived = [key for key in DERIVED_KEYS if key in base]
    if derived:
        raise ConfigError(
            f"DeepSpeed config sets {derived}: these are derived from --batch/--batch-gpu, remove them"
        )
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {list(PRECISION_DTYPES)}, got {precision!r}")
    if precision != "fp32" and base.get("zero_optimization", {}).get("stage", 0) == 0:
        # Stage 0 in bf16/fp16 wraps the optimizer in FP16_Optimizer, whose fp32 master weights the
        # safe_get/set_full_fp32_param API (and so the forced normalisation) cannot reach; stage 1 costs
        # nothing extra on one GPU and keeps them reachable.
        raise ConfigError(f"--precision {precision} needs ZeRO stage >= 1; stage 0 supports fp32 only")
    zero = base.get("zero_optimization", {})
    if base.get("gradient_clipping", 0) and zero.get("compute_grad_norm", True) is False:
        # ds_configs/zero2.json skips the norm (sida_edm2.train.flat_master tests the gradients instead).
        raise ConfigError(
            "gradient_clipping needs zero_optimization.compute_grad_norm true in the DeepSpeed config"
        )
    cfg = copy.deepcopy(base)
    cfg["train_micro_batch_size_per_gpu"] = batch_gpu
    cfg["gradient_accumulation_steps"] = rounds
    cfg["train_batch_size"] = batch_gpu * rounds * world_size
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": precision == "bf16"}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": precision == "fp16"}
    return cfg


def scalar_params_to_1d_(module: torch.nn.Module) -> None:
    """Give every 0-d parameter (EDM2's emb_gain, out_gain) the shape [1], in place.

    DeepSpeed 0.19.8 broadcasts parameters as `p.data.view(torch.uint8)` at initialize (and ZeRO-3
    partitions them the same way), which raises for 0-d tensors. A [1]-shaped gain computes exactly what
    the 0-d one does (it broadcasts, and `gain / sqrt(fan_in)` stays in the gain's dtype), so the
    engine's module keeps this shape for its lifetime; consumers of its state reshape to the 0-d shape.
    """
    for param in module.parameters():
        if param.ndim == 0:
            param.data = param.data.reshape(1)


def aligned_order(params) -> list[torch.nn.Parameter]:
    """The parameters with sizes that are multiples of 8 elements first, the others (the 1-element
    gains) after them, each group in module order.

    DeepSpeed ZeRO-1/2 packs the half-precision working copy of the parameters back to back, in the
    optimizer's order, into one flat buffer and makes every parameter a view of it. In module order a
    1-element gain comes first in every Block, so every later weight started 2 bytes off a 16-byte
    boundary. Eager kernels cope; Inductor's (torch.compile) do not: it compiles one graph per block
    shape against the first block's parameters, treats parameters as static inputs that need no
    alignment check at run time, and reuses the graph for blocks whose weights are misaligned: "CUDA
    error: misaligned address" (benchmarks/block_variants.py reproduces it). In this order every
    weight starts 16-byte aligned."""
    params = list(params)
    return [p for p in params if p.numel() % 8 == 0] + [p for p in params if p.numel() % 8 != 0]


def make_engine(
    module: torch.nn.Module,
    ds_config: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    fused_adam: bool = False,
):
    """A DeepSpeed engine for one trainable network with a client torch.optim.Adam (not AdamW);
    `fused_adam`: on GPUs, torch's single-kernel Adam (the same update; under ZeRO-1/2 it steps
    DeepSpeed's flat fp32 partitions in one kernel each instead of ~a dozen foreach passes)."""
    deepspeed = import_deepspeed()
    scalar_params_to_1d_(module)
    betas = (float(betas[0]), float(betas[1]))  # recent torch rejects the int 0 in (0, 0.999)
    optimizer = torch.optim.Adam(
        aligned_order(module.parameters()), lr=lr, betas=betas, eps=eps,
        fused=True if fused_adam and torch.cuda.is_available() else None,  # CPU runs keep the reference Adam
    )  # fmt: skip
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=copy.deepcopy(ds_config))
    return engine


def build_engines(
    G: torch.nn.Module | None,  # the generator (None for method "edm2")
    F: torch.nn.Module,  # the fake score (method "edm2": the denoiser it trains)
    ds_config: dict,  # build_ds_config's result
    adam: dict,  # lr, betas, eps, fused_adam of both client Adams
    *,
    force_norm: bool,  # forced weight normalisation of the masters after every step
    check_grads: bool,  # the loop skips non-finite steps itself (stage 0 in fp32)
) -> tuple:
    """(engine of G or None, engine of F, masters by engine): each engine with its master-weight handler,
    flat_master.FlatMasters under ZeRO-1/2, ds_master.GatheredMasters otherwise. The EMA follows G, or
    F when there is no G."""
    from sida_edm2.train.ds_master import GatheredMasters
    from sida_edm2.train.flat_master import FlatMasters

    engine_g = make_engine(G, ds_config, **adam) if G is not None else None
    engine_f = make_engine(F, ds_config, **adam)
    flat_stage = ds_config.get("zero_optimization", {}).get("stage", 0) in (1, 2)
    ema_engine = engine_f if engine_g is None else engine_g
    masters = {}
    for engine in (e for e in (engine_g, engine_f) if e is not None):
        keeps_ema = engine is ema_engine
        flat = FlatMasters.attach(engine, normalize=force_norm, ema=keeps_ema)
        if (flat is not None) != flat_stage:
            raise RuntimeError("unexpected DeepSpeed optimizer layout for the ZeRO stage of the config")
        masters[engine] = flat or GatheredMasters(engine, force_norm, keeps_ema, check_grads)
    return engine_g, engine_f, masters


def prepare_teacher(
    teacher: torch.nn.Module,
    device: torch.device,
    precision: str,
    zero3_config: dict | None,
    bake_weights: bool = False,
):
    """The frozen teacher in eval mode, parameters in the training's half precision (fp32 on CPU).

    Replicated on every rank by default; with `zero3_config` (a ZeRO-3 config without optimizer) it is
    partitioned by a ZeRO-3 inference engine and the engine's module is returned. Buffers (the Fourier
    features) stay float32: they only feed fp32 embedding maths. bake_weights: its conv weights are
    replaced once by their effective weights (sida_edm2.model.speed.bake_effective_weights_; same outputs,
    no per-forward renormalisation), before any partitioning.
    """
    from sida_edm2.model.speed import bake_effective_weights_

    dtype = PRECISION_DTYPES[precision] if device.type == "cuda" else torch.float32
    teacher.requires_grad_(False).eval()
    teacher.compute_dtype = dtype
    if zero3_config is not None:
        if bake_weights:
            bake_effective_weights_(teacher, dtype)
        deepspeed = import_deepspeed()
        scalar_params_to_1d_(teacher)
        engine, *_ = deepspeed.initialize(model=teacher, config=copy.deepcopy(zero3_config))
        return engine.module.eval()
    for param in teacher.parameters():
        param.data = param.data.to(device=device, dtype=dtype)
    for buffer in teacher.buffers():
        buffer.data = buffer.data.to(device=device)
    if bake_weights:
        bake_effective_weights_(teacher)  # on the device, from the weights in dtype
    return teacher


def teacher_zero3_config(ds_config: dict) -> dict:
    """A ZeRO-3 inference config for the teacher with the training config's batch and precision."""
    cfg = {key: ds_config[key] for key in (*DERIVED_KEYS, "bf16", "fp16")}
    cfg["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    return cfg


def configure_network(net: torch.nn.Module, cfg) -> int:
    """The run's activation checkpointing (cfg.activation_checkpointing) and speed switches
    (sida_edm2.model.speed) on one network, the switches after the checkpointing wrappers. Returns the
    number of blocks recomputed in backward."""
    from sida_edm2.model import speed

    blocks = enable_activation_checkpointing(net) if cfg.activation_checkpointing else 0
    speed.configure_network(
        net, weight_recompute=cfg.weight_recompute, checkpointed_blocks=cfg.activation_checkpointing,
        channels_last=cfg.channels_last and torch.cuda.is_available(), compile=cfg.compile,
        fused=cfg.fused and fused_kernels_available(),
    )  # fmt: skip
    return blocks


def fused_kernels_available() -> bool:
    """Whether --fused can take effect: its Triton kernels need a GPU; without one the eager networks,
    their reference, run (tests/test_fused.py runs the kernels themselves in Triton's interpreter)."""
    return torch.cuda.is_available()


def enable_activation_checkpointing(net: torch.nn.Module) -> int:
    """Recompute every UNet block (encoder and decoder) during backward instead of storing its activations.

    The block's forward is replaced by a non-reentrant torch.utils.checkpoint call, which restores the
    RNG state for dropout and works with ZeRO-3's parameter hooks (sub-modules are called normally in
    the recomputation). Returns the number of wrapped blocks.
    """
    from sida_edm2.model.networks import Block

    count = 0
    for module in net.modules():
        if isinstance(module, Block):
            module.forward = functools.partial(
                torch.utils.checkpoint.checkpoint, module.forward, use_reentrant=False
            )
            count += 1
    return count
