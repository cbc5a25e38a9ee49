"""Speed and memory switches of the EDM2 networks (issue 7). None changes what a network computes (see
each below for where float rounding may differ).

    from sida_edm2.model import speed
    speed.set_weight_recompute(net, True)       # default: MPConvs recompute their weights in backward
    speed.bake_effective_weights_(teacher)      # a network that never trains: weights become effective ones
    speed.cache_effective_weights(F, True)      # F frozen for a while: effective weights computed once ...
    ...                                         # ... forwards with F's parameters frozen or under no_grad ...
    speed.cache_effective_weights(F, False)     # ... dropped (or invalidate_weight_cache(F) after F changed)
    net.channels_last = True                    # Precond attribute: channels-last activations in the UNet
    speed.compile_blocks(net)                   # torch.compile every UNet Block (and the embedding)
    speed.set_fused(net, True)                  # elementwise chains as fused Triton kernels (GPU)
    speed.configure_network(net, checkpointed_blocks=True, channels_last=True, compile=True)  # training

What each saves (an MPConv's effective weight is normalize(w) * gain / sqrt(fan_in), float32, cast to the
compute dtype; forced weight normalisation is separate, see sida_edm2.model.weight_norm):
- Recomputation: without it autograd keeps a float32 and a compute-dtype copy of every weight per
  trainable forward (6 bytes per parameter in bf16); with it only the parameter itself. The cost is one
  more evaluation of the (elementwise) weight path in backward. Bit-identical outputs and gradients,
  except that in float32 a weight used by several forwards of one backward (the fake score's real and
  fake passes) gets its gradient terms summed in another order.
- Cache: a frozen network stops renormalising its conv weights on every forward; the cache holds one
  compute-dtype copy (2 bytes per parameter in bf16), which is also what autograd would keep for the
  input gradient without recomputation.
  Invalidation is explicit: DeepSpeed writes updated weights through .data, which autograd's version
  counters (checked as well) do not see.
- Baking: the cache without the extra copy, for a network whose weights never change again (the
  teacher): each conv weight is overwritten once by its effective weight in the compute dtype. The
  network then computes what it computed before in that dtype, but its state dict is no longer an
  EDM2 one: never save or export a baked network.
- channels_last: convolutions on NHWC activations (cuDNN's fast path for bf16); CPU results equal to
  float32 rounding.
- compile_blocks: order with activation checkpointing: enable_activation_checkpointing(net) first,
  then compile_blocks(net), so that dynamo traces the checkpoint wrapper (recomputation inside the
  compiled graph). The other order (an eager checkpoint around a compiled forward) computes the same
  but compiles the recomputation again on later calls (seen on CPU). Parameters stay leaf tensors of
  the module (only `forward` attributes are replaced), so DeepSpeed ZeRO-1/2's gradient hooks and its
  module wrapping are unaffected; ZeRO-3's per-module parameter hooks inside compiled blocks are
  untested. Inside compiled code the weight recomputation and the cache are off (Inductor fuses the
  weight path and its partitioner decides what backward keeps); baked weights stay in use.
- Fused kernels (sida_edm2.model.mp_fused): each magnitude-preserving chain of a block (pixel norm, mp_silu,
  modulation + mp_silu, mp_sum + clip), the skip concatenation and every effective weight run as one
  Triton kernel with a hand-written backward instead of 3-8 eager kernels each way. Results equal the
  eager ones to the compute dtype's rounding (the kernels round once, eager after every op). Needs
  triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU, for tests); ignored inside compiled code.
"""

import torch
import torch._inductor.config as inductor_config

from sida_edm2.model.mp_layers import MPConv, effective_weight
from sida_edm2.model.networks import Block, UNet

# dynamo compiles one graph per distinct block configuration (shapes, train/eval, grad mode, output
# needs); EDM2's UNets have up to ~25 distinct blocks, the default limit of 8 per code object is far too low.
_RECOMPILE_LIMIT = 256


def _mpconvs(net: torch.nn.Module) -> list[MPConv]:
    return [m for m in net.modules() if isinstance(m, MPConv)]


def set_weight_recompute(net: torch.nn.Module, enabled: bool) -> None:
    """Whether every MPConv of net recomputes its effective weight in backward (True, the default)
    instead of keeping it alive between forward and backward."""
    for conv in _mpconvs(net):
        conv.recompute_weight = enabled


def cache_effective_weights(net: torch.nn.Module, enabled: bool) -> None:
    """Switch the effective-weight cache of every convolution of net on or off (off also frees it).

    While on, a convolution whose weight (and gain) gets no gradient in a forward - requires_grad
    False, or grad disabled - computes its effective weight once and reuses it. Call
    invalidate_weight_cache(net) after the network's weights changed (e.g. its optimizer step), or
    switch the cache off while the network trains. The linear layers (embeddings, logvar head; under
    10% of the weights) are left out: they run in float32, so a cache would cost 4 bytes per weight, and
    as their inputs need no gradient autograd keeps nothing of theirs anyway."""
    for conv in _mpconvs(net):
        conv.cache_weight = enabled and conv.weight.ndim == 4
        conv.invalidate_weight_cache()


def invalidate_weight_cache(net: torch.nn.Module) -> None:
    """Drop every cached effective weight of net; the next frozen forward recomputes them."""
    for conv in _mpconvs(net):
        conv.invalidate_weight_cache()


def cached_weights(net: torch.nn.Module) -> list[torch.Tensor]:
    """The effective weights net's MPConvs hold in their caches now."""
    return [conv._weight_cache[1] for conv in _mpconvs(net) if conv._weight_cache is not None]


def _gains(net: torch.nn.Module) -> dict[int, torch.Tensor]:
    """The tensor gain each MPConv is called with, by id of the MPConv (others use gain 1)."""
    gains = {}
    for module in net.modules():
        if isinstance(module, Block):
            gains[id(module.emb_linear)] = module.emb_gain
        elif isinstance(module, UNet):
            gains[id(module.out_conv)] = module.out_gain
    return gains


@torch.no_grad()
def bake_effective_weights_(net: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    """Overwrite every convolution weight of a frozen network by its effective weight, in `dtype`
    (default: the weight's dtype; it must be the compute dtype the network will run in), once;
    forwards then use it as it is, and equal those of the unbaked network with parameters cast to
    dtype. The linear layers (noise/label embeddings, logvar head; under 10% of the weights) stay as
    they are: they run in float32 on the float32 embedding whatever the compute dtype.
    Irreversible: for networks that never train or get saved again (the teacher). Call it before any
    ZeRO-3 partitioning of the network."""
    gains = _gains(net)
    for conv in _mpconvs(net):
        if conv.weight_is_effective or conv.weight.ndim != 4:
            continue
        # From the weight and gain cast to dtype first: what the network computes once its parameters
        # are in dtype (the training casts the teacher to the compute dtype), bit for bit.
        cast = dtype or conv.weight.dtype
        gain = gains.get(id(conv), 1.0)
        gain = gain.to(cast) if isinstance(gain, torch.Tensor) else gain
        w = effective_weight(conv.weight.to(cast), gain, cast)
        conv.weight.data = w
        conv.weight_is_effective = True
        conv.invalidate_weight_cache()


def compile_blocks(
    net: torch.nn.Module, mode: str | None = None, embedding: bool = True, alignment_hints: bool = False
) -> int:
    """torch.compile(dynamic=False, mode=mode) the forward of every UNet Block of net (whatever forward
    is set now, e.g. the activation-checkpointing wrapper) and, with `embedding`, each UNet's
    noise/label embedding. Returns the number of compiled blocks. See the module docstring for the
    order with activation checkpointing and DeepSpeed.

    alignment_hints=False (the default) switches Inductor's 16-byte divisibility hints off for the
    whole process (torch._inductor.config.triton.divisible_by_16): Inductor compiles one graph per
    block shape, takes parameters that were 16-byte aligned at compile time for always aligned (it
    checks other inputs at run time, parameters never), and reuses the graph for blocks whose
    parameters are not - DeepSpeed's packed flat buffers - which faults with "CUDA error: misaligned
    address" (reproduced by benchmarks/block_variants.py; sida_edm2.train.engines.aligned_order also
    keeps the weights aligned). Without the hints the compiled XS block ran in 2.2 ms against 4.9 ms
    eager on an H200 (forward + backward, bf16, batch 64)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, _RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * _RECOMPILE_LIMIT)
    if not alignment_hints:
        inductor_config.triton.divisible_by_16 = False
    count = 0
    for module in net.modules():
        if isinstance(module, Block):
            module.forward = torch.compile(module.forward, dynamic=False, mode=mode)
            count += 1
        elif isinstance(module, UNet) and embedding:
            module.embedding = torch.compile(module.embedding, dynamic=False, mode=mode)
    return count


def set_fused(net: torch.nn.Module, enabled: bool) -> None:
    """Whether the Blocks, UNets and MPConvs of net run their elementwise chains and effective weights
    as fused Triton kernels (sida_edm2.model.mp_fused) instead of eager ops."""
    for module in net.modules():
        if isinstance(module, (Block, UNet, MPConv)):
            module.fused = enabled


def configure_network(
    net: torch.nn.Module,
    *,
    weight_recompute: bool = True,
    checkpointed_blocks: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str | None = None,
    fused: bool = False,
) -> None:
    """The training's switches for one Precond, applied after enable_activation_checkpointing(net) (if
    any). Inside checkpointed blocks the weight recomputation is switched off: the block recomputation
    already frees what the block saved, one more evaluation of the weights would only cost time."""
    set_weight_recompute(net, weight_recompute)
    if checkpointed_blocks:
        for block in (m for m in net.modules() if isinstance(m, Block)):
            set_weight_recompute(block, False)
    net.channels_last = channels_last
    set_fused(net, fused)
    if compile:
        compile_blocks(net, mode=compile_mode)
