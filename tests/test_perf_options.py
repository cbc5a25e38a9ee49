"""Speed and memory switches of the networks (issue 7, sida_edm2.model.speed): each computes what the plain
network computes - bit for bit where the same kernels run, to float32 rounding where the layout changes.

Run: .venv/bin/python -m pytest tests/test_perf_options.py            (the full-network compile test is
     marked benchmark: .venv/bin/python -m pytest -m benchmark tests/test_perf_options.py, ~3 min on CPU)
"""

import copy
import functools
import math

import pytest
import torch
from helpers_train import make_dataset, make_teacher, run_scenario

from sida_edm2.model import speed
from sida_edm2.model.mp_layers import MPConv, is_channels_last
from sida_edm2.model.networks import Block, Precond
from sida_edm2.model.presets import get_preset
from sida_edm2.model.weight_norm import normalize_rows_
from sida_edm2.plan.activations import SavedTensorMeter


def tiny_net(**overrides) -> Precond:
    """The tiny preset, fp32, with unit gains so that every layer shapes the output."""
    torch.manual_seed(0)
    net = Precond(**{**get_preset("tiny")["network"], "use_fp16": False, **overrides})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("_gain"):
                p.fill_(1.0)
    return net


def inputs(net: Precond, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    R, C, L = net.img_resolution, net.img_channels, net.label_dim
    x = torch.randn(batch, C, R, R, generator=g).requires_grad_(True)
    sigma = torch.tensor([0.3, 1.7, 12.0, 0.05][:batch])
    labels = torch.nn.functional.one_hot(torch.arange(batch) % L, L).float()
    return x, sigma, labels


def forward_backward(net: Precond, seed: int = 1) -> dict[str, torch.Tensor]:
    """Outputs of all three kinds, and the gradients of a loss that uses them all w.r.t. the input and
    every parameter that requires grad."""
    x, sigma, labels = inputs(net, seed=seed)
    net.zero_grad(set_to_none=True)
    D, disc, logvar = net(x, sigma, labels, output="both", return_logvar=True)
    (D.square().sum() + 3 * disc.sum() + logvar.sum()).backward()
    result = {"D": D.detach(), "disc": disc.detach(), "logvar": logvar.detach(), "x.grad": x.grad}
    result.update({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    return result


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    """Equal to float32 rounding: every tensor within rtol of its own largest magnitude."""
    assert a.keys() == b.keys()
    for name in a:
        scale = a[name].abs().max().clamp(min=1e-30)
        assert ((a[name] - b[name]).abs().max() / scale).item() < rtol, name


# --- 1. Effective weights recomputed in backward ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_weights_give_bit_identical_outputs_and_gradients(dtype):
    net = tiny_net().train().to(dtype)
    net.compute_dtype = dtype
    speed.set_weight_recompute(net, False)
    plain = forward_backward(net)
    speed.set_weight_recompute(net, True)
    assert_identical(plain, forward_backward(net))


def _two_forwards_one_backward(net: Precond) -> dict[str, torch.Tensor]:
    """The fake-score update's pattern: fake and real passes, one backward."""
    net.zero_grad(set_to_none=True)
    x, sigma, labels = inputs(net)
    real = inputs(net, seed=5)[0]
    D, logits_fake, logvar = net(x, sigma, labels, output="both", return_logvar=True)
    logits_real = net(real, sigma, labels, output="disc")
    (D.square().sum() + (logits_fake - logits_real).square().sum() + logvar.sum()).backward()
    return {n: p.grad for n, p in net.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_weights_with_two_forwards_per_backward(dtype):
    """A weight used by two forwards gets its gradient terms summed in another order: in float32, where
    the plain graph has no cast node to sum each forward's terms first, that differs by rounding; in
    bf16 (the GPU training) it does not."""
    net = tiny_net().train().to(dtype)
    net.compute_dtype = dtype
    speed.set_weight_recompute(net, False)
    plain = _two_forwards_one_backward(net)
    speed.set_weight_recompute(net, True)
    recomputed = _two_forwards_one_backward(net)
    if dtype == torch.bfloat16:
        assert_identical(plain, recomputed)
    else:
        assert_close(plain, recomputed, rtol=1e-6)


def test_recomputed_weights_are_the_default():
    assert all(m.recompute_weight for m in tiny_net().modules() if isinstance(m, MPConv))


def test_frozen_network_input_gradients_identical_with_recomputation():
    net = tiny_net().eval().requires_grad_(False)  # the teacher / the fake score in the G update
    speed.set_weight_recompute(net, False)
    plain = forward_backward(net)
    speed.set_weight_recompute(net, True)
    assert_identical(plain, forward_backward(net))


def weight_counts(net: torch.nn.Module) -> tuple[int, int]:
    """Parameters of the MPConv convolutions and of the MPConv linear layers."""
    weights = [m.weight for m in net.modules() if isinstance(m, MPConv)]
    return sum(w.numel() for w in weights if w.ndim == 4), sum(w.numel() for w in weights if w.ndim == 2)


def _saved_bytes(net: Precond, batch: int) -> int:
    x, sigma, labels = inputs(net, batch)
    with SavedTensorMeter([net], batch) as meter:
        net(x, sigma, labels, output="both", return_logvar=True)
    return meter.saved_bytes()


@pytest.mark.parametrize("trainable", [True, False])
def test_recomputation_keeps_no_weight_copies(trainable):
    """Saved bytes are linear in the batch; their batch-independent part is the weight copies. bf16 as
    on the GPU: without recomputation a trainable network keeps a float32 and a bf16 copy of every
    weight (>= 6 bytes per parameter), a frozen one the bf16 copy; with it, nothing."""
    net = tiny_net().train().requires_grad_(trainable).to(torch.bfloat16)
    net.compute_dtype = torch.bfloat16
    convs, linears = weight_counts(net)

    def batch_independent() -> float:
        b1, b2 = 2, 4
        v1, v2 = _saved_bytes(net, b1), _saved_bytes(net, b2)
        return v1 - (v2 - v1) / (b2 - b1) * b1

    speed.set_weight_recompute(net, False)
    plain = batch_independent()
    speed.set_weight_recompute(net, True)
    assert batch_independent() == 0
    # Linear layers (embeddings, logvar) get no input gradient: their bf16 copy is not needed.
    assert plain >= (6 * convs + 4 * linears if trainable else 2 * convs)


# --- 2. Frozen-weight cache and baking ----------------------------------------------------------------


def test_cache_on_a_frozen_network_is_identical_and_computed_once():
    net = tiny_net().eval().requires_grad_(False)
    plain = forward_backward(net)
    speed.cache_effective_weights(net, True)
    first = forward_backward(net)
    cached = speed.cached_weights(net)
    assert len(cached) == sum(isinstance(m, MPConv) and m.weight.ndim == 4 for m in net.modules())
    assert_identical(plain, first)
    assert_identical(plain, forward_backward(net))
    assert all(a is b for a, b in zip(cached, speed.cached_weights(net), strict=True))  # reused
    speed.cache_effective_weights(net, False)
    assert speed.cached_weights(net) == []


def test_cache_is_not_used_while_weights_get_gradients():
    net = tiny_net().train()
    plain = forward_backward(net)
    speed.cache_effective_weights(net, True)
    assert_identical(plain, forward_backward(net))
    assert speed.cached_weights(net) == []
    with torch.no_grad():  # no gradient: the cache serves (G making samples for the fake-score update)
        x, sigma, labels = inputs(net)
        D = net(x, sigma, labels)
    assert len(speed.cached_weights(net)) > 0 and torch.equal(D, plain["D"])


def test_cache_needs_explicit_invalidation_after_data_writes():
    """DeepSpeed writes updated weights (and gains) through .data: the cache cannot see that, hence
    invalidate_weight_cache. In-place updates autograd tracks (normalize_rows_) refresh it by themselves."""
    net = tiny_net().eval().requires_grad_(False)
    speed.cache_effective_weights(net, True)
    x, sigma, labels = inputs(net)
    with torch.no_grad():
        before = net(x, sigma, labels)
        block = net.unet.enc["8x8_block0"]
        block.conv_res0.weight.data = block.conv_res0.weight.data * 3 + 1
        net.unet.out_gain.data = net.unet.out_gain.data * 0.5  # a tensor gain: part of the cached weight
        stale = net(x, sigma, labels)
        speed.invalidate_weight_cache(net)
        fresh = net(x, sigma, labels)
        speed.cache_effective_weights(net, False)
        reference = net(x, sigma, labels)
        speed.cache_effective_weights(net, True)
        net(x, sigma, labels)
        normalize_rows_(block.conv_res0.weight)  # bumps the version counter
        after_norm = net(x, sigma, labels)
        speed.cache_effective_weights(net, False)
        reference_norm = net(x, sigma, labels)
    assert torch.equal(stale, before)  # what a missing invalidation would silently compute
    assert torch.equal(fresh, reference) and not torch.equal(fresh, before)
    assert torch.equal(after_norm, reference_norm) and not torch.equal(after_norm, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_baked_teacher_is_identical(dtype):
    teacher = tiny_net().eval().requires_grad_(False).to(dtype)
    teacher.compute_dtype = dtype
    plain = forward_backward(teacher)
    speed.bake_effective_weights_(teacher)
    speed.bake_effective_weights_(teacher)  # a second call changes nothing
    convs = [m for m in teacher.modules() if isinstance(m, MPConv)]
    assert all(m.weight_is_effective == (m.weight.ndim == 4) for m in convs)  # linear layers stay
    assert_identical(plain, forward_backward(teacher))


def test_baked_teacher_saves_no_weight_copies_and_no_activations_beyond_plain():
    teacher = tiny_net().eval().requires_grad_(False)
    speed.set_weight_recompute(teacher, False)
    plain = _saved_bytes(teacher, 3)
    speed.bake_effective_weights_(teacher)
    # Without baking the frozen network keeps an fp32 copy of each convolution weight for the input
    # gradient (the linear layers' inputs, the embeddings, need none).
    assert plain - _saved_bytes(teacher, 3) == 4 * weight_counts(teacher)[0]


# --- 3. channels_last ------------------------------------------------------------------------------


def test_channels_last_equals_standard_layout_to_fp32_rounding():
    net = tiny_net().train()
    plain = forward_backward(net)
    net.channels_last = True
    layouts = []
    for module in net.modules():
        if isinstance(module, (Block, MPConv)):
            module.register_forward_hook(
                lambda m, args, out: layouts.append(out.ndim < 4 or is_channels_last(out))
            )
    result = forward_backward(net)
    assert layouts and all(layouts)  # every block and conv ran channels-last
    assert result["D"].is_contiguous() and result["disc"].is_contiguous()  # outputs in standard layout
    assert_close(plain, result)


def test_all_options_together_match_plain():
    """Recomputation (trainable F), then F frozen with cache and channels_last (the G update)."""
    net = tiny_net().train()
    speed.set_weight_recompute(net, False)
    plain_train = forward_backward(net)
    net.eval().requires_grad_(False)
    plain_frozen = forward_backward(net)
    speed.set_weight_recompute(net, True)
    speed.cache_effective_weights(net, True)
    net.channels_last = True
    net.train().requires_grad_(True)
    assert_close(plain_train, forward_backward(net))
    net.eval().requires_grad_(False)
    assert_close(plain_frozen, forward_backward(net))


# --- 4. torch.compile -------------------------------------------------------------------------------


def _block_and_inputs():
    torch.manual_seed(0)
    block = Block(16, 32, 24, flavor="enc", attention=True, channels_per_head=8)
    with torch.no_grad():
        block.emb_gain.fill_(1.0)
    g = torch.Generator().manual_seed(1)
    return block, torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 24, generator=g)


def _block_grads(block: Block, x: torch.Tensor, emb: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    y = block(x, emb)
    (y.square().sum() + math.pi * y.sum()).backward()
    return {"y": y.detach(), "x.grad": x.grad, **{n: p.grad for n, p in block.named_parameters()}}


@pytest.mark.slow
def test_compiled_block_under_activation_checkpointing_matches_eager():
    """The documented order: the checkpoint wrapper first, then compile_blocks (about 30 s on CPU)."""
    block, x, emb = _block_and_inputs()
    reference = _block_grads(copy.deepcopy(block), x, emb)
    block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
    holder = torch.nn.ModuleDict({"block": block})
    assert speed.compile_blocks(holder) == 1
    assert_close(reference, _block_grads(block, x, emb))


@pytest.mark.benchmark
def test_compiled_tiny_network_matches_eager():
    """The whole tiny preset with every block and the embedding compiled (~2.5 min of CPU compilation)."""
    net = tiny_net().train()
    reference = forward_backward(copy.deepcopy(net))
    assert speed.compile_blocks(net) == sum(isinstance(m, Block) for m in net.modules())
    assert_close(reference, forward_backward(net))
    assert_close(reference, forward_backward(net))  # second call: the compiled graphs, no recompilation


# --- 5. Wired into the training --------------------------------------------------------------------------


def _train(tmp_path, name: str, assets, **switches) -> dict:
    """Three SiDA iterations (fake score only, SiD, SiDA) of the real Trainer under DeepSpeed ZeRO-2, one
    CPU process, 2 accumulation rounds; the fp32 master weights of G and the fake score and the EMA."""
    teacher, data = assets
    out = tmp_path / f"{name}.pt"
    run_scenario(
        "weights", out, nproc=1, iterations=3, teacher=teacher, data=data, run_dir=tmp_path / name,
        method="sida", zero_stage=2, batch=4, batch_gpu=2, fake_only_kimg=0, sid_only_kimg=0.004,
        **switches,
    )  # fmt: skip
    return torch.load(out)


@pytest.mark.slow
def test_training_with_speed_switches_matches_the_plain_networks(tmp_path):
    """The baked teacher, the cached fake score and activation checkpointing of all three networks give
    bit-identical weights after three iterations; adding weight recomputation (float32: gradient terms
    summed in another order, see above) and channels_last, equal ones up to the float32 rounding that
    Adam's first steps amplify to about one learning rate."""
    assets = make_teacher(tmp_path / "teacher.safetensors"), make_dataset(tmp_path / "data")
    plain = _train(tmp_path, "plain", assets, weight_cache=False, weight_recompute=False)
    cached = _train(tmp_path, "cached", assets, weight_recompute=False, activation_checkpointing=True)
    everything = _train(tmp_path, "all", assets, activation_checkpointing=True, channels_last=True)
    assert plain["phases"] == cached["phases"] == everything["phases"] == ["fake_only", "sid", "sida"]
    for part in ("G", "F", "ema"):
        assert_identical(plain[part], cached[part])
        for key in plain[part]:
            torch.testing.assert_close(everything[part][key], plain[part][key], rtol=0, atol=5e-4)


# --- 6. Parameter order for DeepSpeed's flat buffers ------------------------------------------------


def test_aligned_order_packs_every_weight_on_a_16_byte_boundary():
    """Packed back to back in bf16 as DeepSpeed ZeRO-1/2 packs them, the weights of a real network in
    engines.aligned_order all start 16-byte aligned (in module order, all but the first of each
    Block's are 2 bytes off: what made torch.compile's kernels fault), and no parameter is lost."""
    from sida_edm2.train.engines import aligned_order

    net = tiny_net()
    params = list(net.parameters())

    def misaligned(order) -> int:
        offsets = torch.tensor([0] + [p.numel() for p in order]).cumsum(0)[:-1]
        return sum(
            1 for p, o in zip(order, offsets.tolist(), strict=True) if p.numel() % 8 == 0 and (2 * o) % 16
        )

    assert misaligned(params) > 10
    ordered = aligned_order(params)
    assert misaligned(ordered) == 0
    assert sorted(map(id, ordered)) == sorted(map(id, params))


def test_compile_blocks_switches_inductor_alignment_hints_off():
    """The misaligned-address fix: without alignment_hints, Inductor assumes no 16-byte alignment of
    any pointer, so a graph compiled on aligned parameters stays valid for packed ones."""
    import torch._inductor.config as inductor_config

    saved = inductor_config.triton.divisible_by_16
    try:
        inductor_config.triton.divisible_by_16 = True
        speed.compile_blocks(Block(8, 8, 4))
        assert inductor_config.triton.divisible_by_16 is False
    finally:
        inductor_config.triton.divisible_by_16 = saved
