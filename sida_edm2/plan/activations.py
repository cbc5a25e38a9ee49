"""What autograd saves for backward during the two SiDA updates, measured on the meta device.

    from sida_edm2.plan.activations import measure_activations
    acts = measure_activations("edm2-img512-xxl", "bf16")       # about a second, then cached
    acts["generator_update"].at(batch=16, checkpointing=True)   # Linear(fixed bytes, bytes per image)

The replica of both updates (sida_edm2.plan.flops) runs in the training precision under
`torch.autograd.graph.saved_tensors_hooks` at two micro-batch sizes. Saved bytes are exactly linear in
the micro-batch, so two runs split them into a batch-independent part (the normalised weight copies each
MPConv makes per forward and autograd keeps) and a per-image part (activations). Attention is routed to
the flash-attention op so that it saves what the GPU's fused kernels save (q, k, v, output and
logsumexp); on the meta device scaled_dot_product_attention would otherwise take the math path and
keep the full attention matrix. With activation checkpointing (every UNet block of G, the fake score
and the teacher recomputed in backward) what stays saved is everything saved outside those blocks plus
the block inputs and the cached weights; the largest single block call's internals come on top while it
is recomputed.

The networks use the training's speed options (sida_edm2.model.speed): the teacher's weights baked, MPConv
weights recomputed in backward (inside checkpointed blocks not: the block recomputation already frees
them), and, with `weight_cache`, the frozen fake score's effective weights cached during the generator
update (a compute-dtype copy of its weights, measured as batch-independent saved bytes).
"""

import contextlib
import dataclasses
import functools
import json

import torch

from sida_edm2.model import speed
from sida_edm2.model.networks import Block
from sida_edm2.plan.flops import PASSES, build_iteration_networks, network_kwargs

PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes of the working copies and activations
_MEASURE_BATCHES = (3, 6)  # two batch sizes no weight has as its first dimension (see largest_activation)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedTensorMeter:
    """While active, records every tensor autograd saves for backward, once per storage (a tensor saved
    by several ops, or several views of one storage, count once), parameters and buffers of `modules`
    excluded, each attributed to the innermost running `Block` call of the `checkpointed` modules (None:
    outside those blocks). The inputs of block calls made with grad enabled are recorded too:
    activation checkpointing keeps exactly those."""

    def __init__(
        self,
        modules: list[torch.nn.Module],  # All networks that run (their parameters are not activations).
        batch: int,  # The micro-batch, to tell activations (batch-first) from weight copies.
        checkpointed: list[torch.nn.Module] | None = None,  # Networks whose blocks would be recomputed.
    ):
        self.batch = batch
        self._excluded = {_storage_key(t) for m in modules for t in (*m.parameters(), *m.buffers())}
        checkpointed = modules if checkpointed is None else checkpointed
        self._blocks = [b for m in checkpointed for b in m.modules() if isinstance(b, Block)]
        self.nbytes: dict[int, int] = {}  # storage key -> bytes, of saved tensors and block inputs
        self.contexts: dict[int, set] = {}  # storage key -> block calls (None: outside) that saved it
        self.block_inputs: list[set[int]] = []  # per block call: storage keys of its tensor arguments
        self.largest_activation = 0  # bytes of the largest saved tensor with the batch as first dimension
        self.persistent: set[int] = set()  # storage keys that stay allocated whatever checkpointing does
        self._running: list[int] = []
        self._keep: list[torch.Tensor] = []  # keeps storages alive so their keys stay unique

    def _key(self, t: torch.Tensor) -> int:
        key = _storage_key(t)
        self.nbytes[key] = t.untyped_storage().nbytes()
        self._keep.append(t)
        return key

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if _storage_key(t) not in self._excluded:
            context = self._running[-1] if self._running else None
            self.contexts.setdefault(self._key(t), set()).add(context)
            if t.ndim >= 1 and t.shape[0] == self.batch:
                self.largest_activation = max(self.largest_activation, t.numel() * t.element_size())
        return t

    def _pre_block(self, module, args) -> None:
        # Checkpointing saves every tensor argument, also those the block itself never saves (the input
        # of an upsampling block, which nearest-neighbour interpolation does not need for backward).
        self._running.append(len(self.block_inputs))
        grad = torch.is_grad_enabled()
        self.block_inputs.append({self._key(a) for a in args if grad and isinstance(a, torch.Tensor)})

    def _post_block(self, module, args, output) -> None:
        self._running.pop()

    def __enter__(self) -> "SavedTensorMeter":
        self._handles = [b.register_forward_pre_hook(self._pre_block) for b in self._blocks]
        self._handles += [b.register_forward_hook(self._post_block) for b in self._blocks]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    def mark_persistent(self, tensors: list[torch.Tensor]) -> None:
        """Tensors allocated through the pass whether autograd saves them or not (cached weights): counted
        in full, and with checkpointing kept rather than among the internals of blocks that saved them."""
        for t in tensors:
            key = self._key(t)
            self.contexts.setdefault(key, set())
            self.persistent.add(key)

    def saved_bytes(self) -> int:
        """Everything saved (no checkpointing)."""
        return sum(self.nbytes[key] for key in self.contexts)

    def kept_with_checkpointing(self) -> int:
        """What checkpointed blocks still keep: tensors saved outside any block, the block inputs and
        the persistent tensors."""
        kept = set().union(*self.block_inputs) | {key for key, ctx in self.contexts.items() if None in ctx}
        kept |= self.persistent
        return sum(self.nbytes[key] for key in kept)

    def block_internals(self) -> list[int]:
        """Per block call: bytes its recomputation holds (what it saved, less its own inputs)."""
        totals = [0] * len(self.block_inputs)
        for key, ctx in self.contexts.items():
            for call in ctx - {None}:
                kept = key in self.block_inputs[call] or key in self.persistent
                totals[call] += 0 if kept else self.nbytes[key]
        return totals


def _flash_attention(q, k, v, *args, **kwargs):
    if args or kwargs:
        raise ValueError("the planner's attention stand-in supports plain (q, k, v) calls only")
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]


@contextlib.contextmanager
def fused_attention_on_meta():
    """Route scaled_dot_product_attention to the flash-attention op, which the meta device supports and
    which saves for backward what the GPU's fused kernels save (not the math path's attention matrix)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


@dataclasses.dataclass(frozen=True)
class Linear:
    """fixed + per_image * batch bytes."""

    fixed: float
    per_image: float

    def at(self, batch: int) -> float:
        return self.fixed + self.per_image * batch


def _fit(values: list[int]) -> Linear:
    (b1, b2), (v1, v2) = _MEASURE_BATCHES, values
    per_image = (v2 - v1) / (b2 - b1)
    return Linear(v1 - per_image * b1, per_image)


@dataclasses.dataclass(frozen=True)
class PassActivations:
    """Saved tensors of one update's forward (bytes, linear in the micro-batch)."""

    saved: Linear  # without checkpointing
    kept_with_checkpointing: Linear  # outside the blocks + block inputs
    block_internals: tuple[Linear, ...]  # per block call
    largest_activation_per_image: float

    def at(self, batch: int, checkpointing: bool) -> Linear:
        """The saved bytes at `batch` as (batch-independent, per-image) terms."""
        if not checkpointing:
            return self.saved
        largest = max(self.block_internals, key=lambda internals: internals.at(batch))
        kept = self.kept_with_checkpointing
        return Linear(kept.fixed + largest.fixed, kept.per_image + largest.per_image)


def _measure(
    network: dict,
    dtype: torch.dtype,
    checkpointing: bool,
    weight_cache: bool,
    weight_recompute: bool,
    fused: bool,
) -> dict[str, list[SavedTensorMeter]]:
    """Per update, one meter per _MEASURE_BATCHES entry, the networks set up as the training sets them
    up with or without activation checkpointing (the meters only attribute, nothing is recomputed)."""
    nets = build_iteration_networks(network, "meta", dtype)  # the teacher baked
    nets.cache_fake_score_weights = weight_cache
    if not weight_recompute:
        for net in nets.modules():
            speed.set_weight_recompute(net, False)
    for net in nets.modules():  # on the meta device the fused Functions save, but launch nothing
        speed.set_fused(net, fused)
    if checkpointing:
        for block in (b for net in nets.modules() for b in net.modules() if isinstance(b, Block)):
            speed.set_weight_recompute(block, False)
    meters = {}
    for name, run_pass in PASSES.items():
        meters[name] = []
        for batch in _MEASURE_BATCHES:
            meter = SavedTensorMeter(list(nets.modules()), batch)  # every network's blocks
            with fused_attention_on_meta(), meter:
                run_pass(nets, batch)
            meter.mark_persistent(speed.cached_weights(nets.fake_score))  # the generator pass fills it
            speed.cache_effective_weights(nets.fake_score, False)
            meters[name].append(meter)
    return meters


@functools.lru_cache(maxsize=32)
def _measure_cached(
    network_json: str, precision: str, weight_cache: bool, weight_recompute: bool, fused: bool
) -> dict[str, PassActivations]:
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16  # fp16 saves as many bytes as bf16
    network = json.loads(network_json)
    plain = _measure(network, dtype, False, weight_cache, weight_recompute, fused)
    checkpointed = _measure(network, dtype, True, weight_cache, weight_recompute, fused)
    results = {}
    for name in PASSES:
        internals = [m.block_internals() for m in checkpointed[name]]
        results[name] = PassActivations(
            saved=_fit([m.saved_bytes() for m in plain[name]]),
            kept_with_checkpointing=_fit([m.kept_with_checkpointing() for m in checkpointed[name]]),
            block_internals=tuple(_fit(list(calls)) for calls in zip(*internals, strict=True)),
            largest_activation_per_image=plain[name][-1].largest_activation / _MEASURE_BATCHES[-1],
        )
    return results


def measure_activations(
    network: str | dict,
    precision: str = "bf16",
    weight_cache: bool = True,
    weight_recompute: bool = True,
    fused: bool = False,
) -> dict[str, PassActivations]:
    """Saved tensors of the fake-score and generator updates of a preset (or Precond kwargs), measured
    on the meta device (about two seconds per network size and precision, then cached). weight_cache:
    whether the frozen fake score's weights are cached in the generator update (the training does so
    unless the fake score is partitioned by ZeRO-3 or --no-weight-cache is given); weight_recompute:
    whether MPConv weights are recomputed in backward (else their copies count as saved bytes);
    fused: the networks' fused Triton kernels (sida_edm2.model.mp_fused; needs triton importable)."""
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision must be one of {list(PRECISION_BYTES)}, got {precision!r}")
    network_json = json.dumps(network_kwargs(network), sort_keys=True)
    return _measure_cached(network_json, precision, weight_cache, weight_recompute, fused)
