"""The optimizer's fp32 master weights of a DeepSpeed engine: read them whole, rewrite them, keep the
module's working copy equal. Used for forced weight normalisation and for the EMA of G under ZeRO-0/3
(ZeRO-1/2 do both inside the optimizer step: sida_edm2.train.flat_master), at the start of a run, and to
read the masters whole (tests, consolidated exports).

    for name, value in visit_master_weights(engine, normalize=True):   # once per optimizer step
        ema.update(name, value, beta)

    masters = GatheredMasters(engine, normalize=True, keeps_ema=True, check_grads=False)
    masters.start(ema)                  # a start without checkpoint: normalised masters, EMA := masters
    skipped = masters.step(beta, ema)   # engine.step(); at the accumulation boundary: skipped or not

GatheredMasters and flat_master.FlatMasters are the two implementations of one small interface the
Trainer uses (start, step, gather_ema, scatter_ema); engines.build_engines picks one per engine.

Where the master weights live (DeepSpeed 0.19.8):
- ZeRO 1/2 and bf16 at stage 0: flat fp32 partitions behind `param._hp_mapping`; the module's parameter
  (bf16 or fp32) is a separate working copy that DeepSpeed refreshes from them after each step.
- ZeRO 3: fp32 partitions in the ZeRO-3 optimizer; the module's parameter holds only its partition
  (`ds_tensor`) of the working copy.
- Stage 0 in fp32: no wrapper; the module's parameter is the master itself.
`deepspeed.utils.safe_get_full_fp32_param` / `safe_set_full_fp32_param` read and write the first two
kinds (the read is a collective: every rank must call it, in the same order). Writing the master alone
would let the module compute with stale weights until the next step, so the working copy is written too:
`p.data` for stages 0-2, `GatheredParameters(modifier_rank=0)` for stage 3, which re-partitions the value.
"""

from collections.abc import Iterator

import torch

from sida_edm2.model.weight_norm import mp_weight_params, normalize_rows_


def _is_zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def read_master(param: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 master value of `param` (a collective under ZeRO). For stage 0 fp32 this is the
    parameter's own storage, so in-place changes to it change the master."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param)
    if value is not None:
        return value
    if _is_zero3(param):
        raise RuntimeError("a ZeRO-3 parameter without fp32 master (requires_grad=False?)")
    if param.dtype != torch.float32:
        raise RuntimeError(f"no fp32 master weights for a {param.dtype} parameter outside a ZeRO optimizer")
    return param.data


def write_master_(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write the full fp32 `value` into the master weights of `param` and into its working copy.

    Every rank must call it with the same value (all ranks hold it after `read_master`).
    """
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value)
    if _is_zero3(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                param.data.copy_(value)
    elif param.data.data_ptr() != value.data_ptr():
        param.data.copy_(value)


@torch.no_grad()
def visit_master_weights(engine, normalize: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full fp32 master value) for every trainable parameter of the engine's module, after
    rescaling each MPConv weight's rows to RMS 1 (master and working copy) when `normalize` is set.

    Collective: every rank must exhaust the iterator. The yielded tensors may be the master storage
    itself (stage 0 fp32): read them, do not modify them.
    """
    mp_names = {name for name, _ in mp_weight_params(engine.module)}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        value = read_master(param)
        if normalize and name in mp_names:
            normalize_rows_(value)
            write_master_(param, value)
        yield name, value


def normalize_master_weights_(engine) -> None:
    """Forced weight normalisation of the engine's master weights (and working copy), nothing else."""
    for _ in visit_master_weights(engine, normalize=True):
        pass


def update_masters_(engine, normalize: bool, ema, keeps_ema: bool, beta: float) -> None:
    """Normalise the masters (normalize) and, for the engine that keeps the EMA, move `ema` (a NetworkEMA
    on rank 0, None elsewhere) towards them with `beta` (0 copies them). Collective."""
    if keeps_ema:
        for name, value in visit_master_weights(engine, normalize=normalize):
            if ema is not None:
                ema.update(name, value, beta)
    elif normalize:
        normalize_master_weights_(engine)


class GatheredMasters:
    """Forced normalisation and the EMA from the masters gathered whole after each step (ZeRO-0/3)."""

    def __init__(
        self,
        engine,  # the DeepSpeed engine
        normalize: bool,  # forced weight normalisation after every step taken
        keeps_ema: bool,  # this engine's network is the one the EMA follows
        check_grads: bool,  # skip steps with non-finite gradients here (stage 0 fp32: nothing else does)
    ):
        self.engine, self.normalize = engine, normalize
        self.keeps_ema, self.check_grads = keeps_ema, check_grads

    def start(self, ema) -> None:
        """A start without checkpoint: normalised masters, EMA := masters. Collective."""
        update_masters_(self.engine, self.normalize, ema, self.keeps_ema, beta=0.0)

    def step(self, beta: float, ema) -> bool | None:
        """engine.step(); at the accumulation boundary also the normalisation and EMA of a step taken, and
        whether the step was skipped for non-finite gradients (None between boundaries)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        dropped = boundary and self.check_grads and drop_nonfinite_grads_(self.engine)
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        if not boundary:
            return None
        skipped = dropped or self.engine.skipped_steps != skipped_before
        update_masters_(self.engine, self.normalize and not skipped, ema, self.keeps_ema, beta)
        return skipped

    def gather_ema(self, ema) -> None:
        """Nothing to gather: `ema` itself is updated after every step."""

    def scatter_ema(self, ema) -> None:
        """Nothing to scatter: `ema` itself, as loaded from a checkpoint, is the EMA."""


def master_state_dict(engine) -> dict[str, torch.Tensor]:
    """Copies of all full fp32 master weights (collective): for tests and consolidated exports."""
    return {
        name: value.detach().clone().cpu() for name, value in visit_master_weights(engine, normalize=False)
    }


def drop_nonfinite_grads_(engine) -> bool:
    """Stage 0 in fp32 has no DeepSpeed wrapper that skips a step with NaN/Inf gradients: drop all
    gradients (Adam then leaves every parameter and its state untouched) and return True when any is
    non-finite. Call at the accumulation boundary, after the last backward and before engine.step()."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return False
    finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
    if bool(finite):
        return False
    for param in engine.module.parameters():
        param.grad = None
    return True
