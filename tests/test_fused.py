"""The fused Triton kernels of sida_edm2.model.mp_fused against the eager reference
(sida_edm2.model.mp_layers): values and gradients of each fused chain, in both activation layouts,
and whole blocks.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before mp_fused
is imported), in float32, where fused and eager agree to float32 rounding. The tests marked
`benchmark` need a GPU: the fused network and a full fused training iteration (fused kernels and
fused Adam) against the eager ones in bf16, to bf16 rounding.

Run: .venv/bin/python -m pytest tests/test_fused.py            (needs triton: pip install triton)
     python -m pytest -m benchmark tests/test_fused.py          (on a GPU machine)
"""


import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")  # without a GPU it runs in its interpreter: tests/conftest.py sets that up

from helpers_train import make_teacher  # noqa: E402

from sida_edm2.model import mp_fused, speed  # noqa: E402
from sida_edm2.model.mp_layers import effective_weight, mp_cat, mp_silu, mp_sum, normalize  # noqa: E402
from sida_edm2.model.networks import Block  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(autouse=True)
def no_tf32():
    """Float32 convolutions and matmuls in float32 on the GPU too (TF32 would round both paths'
    slightly different inputs to different 10-bit mantissas)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True, scope="module")
def interpreter_numpy2_index():
    """Triton 3.6's interpreter converts a scalar to int with int(1-element array), which NumPy >= 2.4
    refuses; `range(0, C, BLOCK)` over a kernel argument needs it. Patched for these tests only."""
    if CUDA:
        yield
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch
    yield
    interpreter._patch_lang_tensor = original


def layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Largest difference relative to the largest magnitude of the reference."""
    scale = expected.abs().max().clamp_min(1e-12)
    assert ((actual - expected).abs().max() / scale).item() < rel


def values_and_grads(fn, inputs: list[torch.Tensor], grad: torch.Tensor):
    """Inputs and grad are made on the CPU (seeded) and moved to the test device here."""
    inputs = [t.to(DEVICE).requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return out.detach(), torch.autograd.grad(out, inputs, grad.to(DEVICE))


def check(fused_fn, eager_fn, inputs: list[torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
    out_f, grads_f = values_and_grads(fused_fn, inputs, grad)
    out_e, grads_e = values_and_grads(eager_fn, inputs, grad)
    assert out_f.stride() == out_e.stride()  # the layout is kept
    assert_close(out_f, out_e)
    for got, expected in zip(grads_f, grads_e, strict=True):
        assert_close(got, expected)
    return out_e


@pytest.mark.parametrize("channels_last", [False, True])
def test_elementwise_chains_match_eager(channels_last):
    gen = torch.Generator().manual_seed(0)
    # C > one channel tile, pixels > one pixel block (and split in the modulation's backward).
    x = layout(torch.randn(2, 70, 9, 9, generator=gen), channels_last)
    b = layout(3 * torch.randn(2, 70, 9, 9, generator=gen), channels_last)
    lin = torch.randn(2, 70, generator=gen)
    # The upstream gradient in the other layout: the kernels must read it at the right positions.
    grad = layout(torch.randn(2, 70, 9, 9, generator=gen), not channels_last)

    check(mp_fused.mp_silu, mp_silu, [x], grad)
    check(mp_fused.pixel_norm, lambda v: normalize(v, dim=1), [x], grad)
    check(mp_fused.modulated_mp_silu, lambda y, m: mp_silu(y * (m + 1)[:, :, None, None]), [x, lin], grad)
    check(lambda u, v: mp_fused.mp_sum(u, v, 0.3), lambda u, v: mp_sum(u, v, 0.3), [x, b], grad)
    out = check(
        lambda u, v: mp_fused.mp_sum(u, v, 0.3, clip=1.5),
        lambda u, v: mp_sum(u, v, 0.3).clip(-1.5, 1.5),
        [x, b],
        grad,
    )
    assert (out.abs() == 1.5).any() and (out.abs() < 1.5).any()  # both sides of the clip are tested
    check(
        lambda u, v: mp_cat(u, v, t=0.7, fused=True), lambda u, v: mp_cat(u, v, t=0.7), [x, b[:, :9]], layout(
            torch.randn(2, 79, 9, 9, generator=gen), channels_last
        ),
    )  # fmt: skip


@pytest.mark.parametrize("shape", [[6, 5, 3, 3], [7, 9]])
@pytest.mark.parametrize("tensor_gain", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_effective_weight_matches_eager(shape, tensor_gain, channels_last):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(shape, generator=gen)
    grad = layout(torch.randn(shape, generator=gen), channels_last and len(shape) == 4)
    if tensor_gain:  # a trainable 0-d gain (emb_gain, out_gain) gets its gradient too
        inputs = [weight, torch.tensor(1.7)]
        check(
            lambda w, g: effective_weight(w, g, torch.float32, channels_last, fused=True),
            lambda w, g: effective_weight(w, g, torch.float32, channels_last),
            inputs,
            grad,
        )
    else:
        check(
            lambda w: effective_weight(w, 0.8, torch.float32, channels_last, fused=True),
            lambda w: effective_weight(w, 0.8, torch.float32, channels_last),
            [weight],
            grad,
        )


def block_outputs(block: Block, x: torch.Tensor, emb: torch.Tensor, grad: torch.Tensor) -> dict:
    x, emb = x.to(DEVICE).requires_grad_(True), emb.to(DEVICE).requires_grad_(True)
    block.zero_grad(set_to_none=True)
    out = block(x, emb)
    out.backward(grad.to(DEVICE))
    result = {"out": out.detach(), "x.grad": x.grad, "emb.grad": emb.grad}
    result.update({name: p.grad for name, p in block.named_parameters()})
    return result


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=4, out_channels=8, flavor="enc", resample_mode="down", attention=True),
        dict(in_channels=12, out_channels=8, flavor="dec", resample_mode="up"),
    ],
    ids=["enc-down-attention", "dec-up-skip"],
)
def test_fused_block_matches_eager(kwargs, channels_last):
    """Every fused piece inside a Block (encoder: skip conv, pixel norm, attention; decoder: skip conv
    after the branch), its effective weights recomputed in backward, against the eager Block."""
    torch.manual_seed(0)
    block = Block(emb_channels=12, channels_per_head=4, clip_act=2.0, **kwargs).to(DEVICE)
    with torch.no_grad():
        block.emb_gain.fill_(0.8)
    gen = torch.Generator().manual_seed(2)
    x = layout(torch.randn(2, kwargs["in_channels"], 4, 4, generator=gen) * 2, channels_last)
    emb = torch.randn(2, 12, generator=gen)
    size = 2 if kwargs["resample_mode"] == "down" else 8
    grad = torch.randn(2, 8, size, size, generator=gen)
    eager = block_outputs(block, x, emb, grad)
    speed.set_fused(block, True)
    fused = block_outputs(block, x, emb, grad)
    assert eager.keys() == fused.keys()
    for name in eager:
        assert_close(fused[name], eager[name], rel=5e-5)


# --- GPU: bf16 networks and a whole training iteration ----------------------------------------------


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


@pytest.mark.benchmark
@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_network_matches_eager_on_gpu(channels_last):
    """The XS architecture, forward and backward, fused against eager: in float32 to float32 rounding
    (relative L2 error of every output and gradient under 1e-4); in bf16 each fused output and
    gradient is about as far from the float32 reference as the eager bf16 one (bf16 rounding through
    30 blocks moves some gradients by a few percent either way)."""
    from sida_edm2.model.networks import Precond
    from sida_edm2.model.presets import get_preset

    torch.manual_seed(0)
    net = Precond(**get_preset("edm2-img512-xs")["network"]).to(DEVICE)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("_gain"):
                p.fill_(1.0)
    net.channels_last = channels_last
    x = torch.randn(4, 4, 64, 64, device=DEVICE)
    sigma = torch.tensor([0.1, 0.7, 2.5, 20.0], device=DEVICE)
    labels = torch.nn.functional.one_hot(torch.arange(4, device=DEVICE) * 7, 1000).float()

    def run(dtype: torch.dtype, fused: bool) -> dict:
        net.compute_dtype = dtype
        speed.set_fused(net, fused)
        net.zero_grad(set_to_none=True)
        D, disc, logvar = net(x, sigma, labels, output="both", return_logvar=True)
        (D.square().mean() + disc.mean() + logvar.mean()).backward()
        result = {"D": D.detach(), "disc": disc.detach()}
        result.update({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
        return result

    reference = run(torch.float32, fused=False)
    fused32 = run(torch.float32, fused=True)
    assert max(relative_error(fused32[k], reference[k]) for k in reference) < 1e-4
    eager16, fused16 = run(torch.bfloat16, fused=False), run(torch.bfloat16, fused=True)
    for key in reference:
        eager_error = relative_error(eager16[key], reference[key])
        assert relative_error(fused16[key], reference[key]) <= 1.5 * eager_error + 1e-3, key


@pytest.mark.benchmark
@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_fused_iteration_matches_eager_on_gpu(tmp_path):
    """Two SiDA iterations of the real Trainer (DeepSpeed ZeRO-2, bf16) with the fused kernels, fused
    Adam and channels_last against the eager networks and foreach Adam: the same losses to bf16
    rounding and fp32 master weights within a fraction of the two Adam steps they took."""
    from sida_edm2.train.config import resolve_config
    from sida_edm2.train.ds_master import master_state_dict
    from sida_edm2.train.trainer import Trainer

    teacher = make_teacher(tmp_path / "teacher.safetensors")
    gen = torch.Generator(DEVICE).manual_seed(3)
    batches = [
        (torch.randn(4, 4, 16, 16, generator=gen, device=DEVICE), torch.eye(10, device=DEVICE)[[1, 4, 7, 9]])
        for _ in range(2)
    ]
    lr = 1e-3
    results = {}
    for name, switches in (("eager", {}), ("fused", dict(fused=True, fused_adam=True, channels_last=True))):
        cfg = resolve_config(
            "tiny", run_dir=str(tmp_path / name), external_data=True, teacher=str(teacher), method="sida",
            batch=4, batch_gpu=4, zero_stage=2, precision="bf16", lr=lr, fake_only_kimg=0.0,
            sid_only_kimg=0.0, max_kimg=1e9, checkpoint_kimg=1e9, tick_kimg=1e9, **switches,
        )  # fmt: skip
        trainer = Trainer(cfg, data_iter=iter(batches))
        for _ in range(2):
            trainer.run_iteration()
        results[name] = dict(
            losses=trainer.stats.reduce(),
            G=master_state_dict(trainer.engine_g),
            F=master_state_dict(trainer.engine_f),
        )
    eager, fused = results["eager"], results["fused"]
    assert eager["losses"].keys() == fused["losses"].keys()
    for key, value in eager["losses"].items():
        assert abs(fused["losses"][key] - value) <= 2e-2 * abs(value) + 1e-6, key
    for part in ("G", "F"):
        for key, value in eager[part].items():
            diff = (fused[part][key] - value).abs()
            # Adam moves each weight by about lr per step whatever the gradient's size, so rounding
            # can at worst flip a tiny gradient's sign: 2 steps * 2 lr; typically far below.
            assert diff.max() <= 4 * lr, (part, key)
            assert diff.mean() <= 0.5 * lr, (part, key)


def test_planner_measures_what_the_fused_functions_save():
    """On the meta device the fused Functions launch nothing but save for backward what they save on a
    GPU, so the memory planner can measure them: less than eager (the modulation keeps its input, not
    also the modulated product; no float32 weight copies)."""
    from sida_edm2.model.presets import get_preset
    from sida_edm2.plan.activations import measure_activations

    network = get_preset("tiny")["network"]
    saved = {
        fused: measure_activations(network, "bf16", True, False, fused)["generator_update"].saved.at(8)
        for fused in (False, True)
    }
    assert 0 < saved[True] < 0.95 * saved[False]
