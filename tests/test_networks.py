"""EDM2 network: official names and numbers, preconditioning, return modes, precisions, generator.

Run: .venv/bin/python -m pytest tests/test_networks.py
"""

import json
import math

import numpy as np
import pytest
import torch

from sida_edm2.model.mp_layers import MPConv, mp_cat, mp_silu, mp_sum, normalize, resample
from sida_edm2.model.networks import Precond, precond_coefficients
from sida_edm2.model.presets import get_preset


def tiny_net(**overrides) -> Precond:
    """The tiny preset with its zero-initialised gains set to 1, so the output depends on every layer
    (a fresh network returns c_skip*x whatever the UNet computes)."""
    torch.manual_seed(0)
    net = Precond(**{**get_preset("tiny")["network"], **overrides})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("_gain"):
                p.fill_(1.0)
    return net


def tiny_inputs(net: Precond, batch: int = 3):
    g = torch.Generator().manual_seed(1)
    R, C, L = net.img_resolution, net.img_channels, net.label_dim
    sigma = torch.tensor([0.3, 1.7, 12.0][:batch])
    x = torch.randn(batch, C, R, R, generator=g) * (0.25 + sigma**2).sqrt()[:, None, None, None]
    labels = torch.nn.functional.one_hot(torch.arange(batch) % L, L).float() if L else None
    return x, sigma, labels


# --- Official EDM2 test vectors (reference/edm2-test-vectors.md) ----------------------------------

TEST_VECTORS = {
    "small": dict(
        R=32, L=10, C=64, channel_mult=[1, 2, 2], keys=161, mean=-0.02051828, std=0.34146520,
        head=[-0.27357095, 0.10059320, 0.04346418], tail=[-0.01027849, 0.35953632, 0.04085256],
        logvar=[-1.97806036, -1.56381536],
    ),
    "xs": dict(
        R=64, L=1000, C=128, channel_mult=[1, 2, 3, 4], keys=203, mean=-0.03457510, std=0.40686610,
        head=[-0.19319943, -0.20014584, -0.19098683], tail=[0.12306804, 0.20822614, 0.12561472],
        logvar=[-1.97806036, -1.56381536],
    ),
}


@pytest.mark.parametrize("config", list(TEST_VECTORS))
def test_matches_official_edm2_test_vectors(config):
    tv = TEST_VECTORS[config]
    R, L = tv["R"], tv["L"]
    # Built on meta and materialised empty: every tensor is overwritten below, so skip the random init.
    with torch.device("meta"):
        net = Precond(
            img_resolution=R, img_channels=4, label_dim=L, model_channels=tv["C"],
            channel_mult=tv["channel_mult"], dropout=0,
        )
    net = net.to_empty(device="cpu").eval()
    state = net.state_dict()
    assert len(state) == tv["keys"]
    filled = {
        key: torch.from_numpy(np.random.RandomState(i).standard_normal(state[key].shape).astype(np.float32))
        for i, key in enumerate(sorted(state))
    }
    net.load_state_dict(filled, strict=True)

    sigma = torch.tensor([0.5, 2.0])
    x = torch.from_numpy(np.random.RandomState(1000).standard_normal([2, 4, R, R]).astype(np.float32))
    x = x * (0.25 + sigma**2).sqrt().reshape(-1, 1, 1, 1)
    labels = torch.zeros(2, L)
    labels[0, 3] = 1
    labels[1, 7] = 1
    with torch.no_grad():
        D, logvar = net(x, sigma, labels, return_logvar=True)

    assert D.dtype == torch.float32 and logvar.shape == (2, 1, 1, 1)
    # fp32 summation order differs between implementations: ~1e-6 relative, a few 1e-7 absolute.
    assert D.mean().item() == pytest.approx(tv["mean"], rel=1e-5)
    assert D.std().item() == pytest.approx(tv["std"], rel=1e-5)
    torch.testing.assert_close(D[0, 0, 0, :3], torch.tensor(tv["head"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(D[1, 3, -1, -3:], torch.tensor(tv["tail"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logvar.flatten(), torch.tensor(tv["logvar"]), rtol=1e-6, atol=1e-6)


# --- State-dict layout ----------------------------------------------------------------------------


def test_state_dict_names_and_shapes_match_edm2_xs():
    with torch.device("meta"):
        net = Precond(**get_preset("edm2-img512-xs")["network"])
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = {
        "unet.out_gain": (),
        "unet.emb_fourier.freqs": (128,),
        "unet.emb_fourier.phases": (128,),
        "unet.emb_noise.weight": (512, 128),
        "unet.emb_label.weight": (512, 1000),
        "unet.enc.64x64_conv.weight": (128, 5, 3, 3),
        "unet.enc.64x64_block0.emb_gain": (),
        "unet.enc.64x64_block0.conv_res0.weight": (128, 128, 3, 3),
        "unet.enc.64x64_block0.emb_linear.weight": (128, 512),
        "unet.enc.32x32_down.conv_res1.weight": (128, 128, 3, 3),
        "unet.enc.32x32_block0.conv_skip.weight": (256, 128, 1, 1),
        "unet.enc.16x16_block0.attn_qkv.weight": (1152, 384, 1, 1),
        "unet.dec.8x8_in0.attn_qkv.weight": (1536, 512, 1, 1),
        "unet.dec.8x8_in0.attn_proj.weight": (512, 512, 1, 1),
        "unet.dec.8x8_block0.conv_res0.weight": (512, 1024, 3, 3),
        "unet.dec.16x16_up.conv_res0.weight": (512, 512, 3, 3),
        "unet.dec.64x64_block3.conv_skip.weight": (128, 256, 1, 1),
        "unet.out_conv.weight": (4, 128, 3, 3),
        "logvar_fourier.freqs": (128,),
        "logvar_fourier.phases": (128,),
        "logvar_linear.weight": (1, 128),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert len(shapes) == 203
    assert not any(k.endswith(".bias") for k in shapes)
    assert "unet.enc.8x8_block0.attn_qkv.weight" in shapes
    assert "unet.enc.32x32_block0.attn_qkv.weight" not in shapes
    assert "unet.dec.8x8_in1.attn_qkv.weight" not in shapes  # only in0 of the bottom pair attends
    enc, dec = list(net.unet.enc), list(net.unet.dec)
    assert enc[:5] == ["64x64_conv", "64x64_block0", "64x64_block1", "64x64_block2", "32x32_down"]
    assert enc[-1] == "8x8_block2" and len(enc) == 1 + 3 + 3 * 4
    assert dec[:3] == ["8x8_in0", "8x8_in1", "8x8_block0"]
    assert dec[5:7] == ["8x8_block3", "16x16_up"]
    assert dec[-1] == "64x64_block3" and len(dec) == 2 + 4 + 3 * 5


# --- Preconditioning ------------------------------------------------------------------------------


def test_fresh_network_returns_exactly_c_skip_times_x():
    # emb_gain and out_gain are 0; dropout on, so that train mode differs from eval mode inside.
    net = Precond(**{**get_preset("tiny")["network"], "dropout": 0.1})
    x, sigma, labels = tiny_inputs(net)
    c_skip = net.coefficients(sigma)[0].reshape(-1, 1, 1, 1)
    for training in (True, False):  # set each mode right before its forward
        net.train(training)
        assert all(m.training is training for m in net.modules())
        assert torch.equal(net(x, sigma, labels), c_skip * x)


@pytest.mark.parametrize("sigma", [0.002, 0.5, 1.0, 80.0])
def test_precond_coefficients(sigma):
    c_skip, c_out, c_in, c_noise = precond_coefficients(torch.tensor(sigma), sigma_data=0.5)
    s, sd = np.float64(sigma), 0.5
    assert c_skip.item() == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-6)
    assert c_out.item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-6)
    assert c_in.item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-6)
    assert c_noise.item() == pytest.approx(math.log(s) / 4, rel=1e-6, abs=1e-7)


def test_precond_coefficients_at_sigma_one():
    c_skip, c_out, c_in, c_noise = precond_coefficients(1.0)
    assert c_skip.item() == pytest.approx(0.2, abs=1e-7)
    assert c_out.item() == pytest.approx(0.44721359, abs=1e-7)
    assert c_in.item() == pytest.approx(0.89442718, abs=1e-7)
    assert c_noise.item() == 0.0


def test_scalar_sigma_equals_per_sample_sigma():
    net = tiny_net().eval()
    x, _, labels = tiny_inputs(net)
    with torch.no_grad():
        torch.testing.assert_close(net(x, 0.7, labels), net(x, torch.full([3], 0.7), labels), rtol=0, atol=0)


# --- Return modes ---------------------------------------------------------------------------------


def test_disc_mode_skips_decoder_and_equals_both_pass():
    net = tiny_net().eval()
    x, sigma, labels = tiny_inputs(net)
    calls = []
    for name, block in [*net.unet.dec.items(), ("out_conv", net.unet.out_conv)]:
        block.register_forward_hook(lambda *_, name=name: calls.append(name))
    with torch.no_grad():
        disc, logvar = net(x, sigma, labels, output="disc", return_logvar=True)
        assert calls == []
        D_both, disc_both = net(x, sigma, labels, output="both")
        assert len(calls) == len(net.unet.dec) + 1
        D = net(x, sigma, labels)
    # Tiny preset: 16x16 latents, 2 levels -> the last encoder block runs at 16 / 2**(2-1) = 8.
    assert disc.shape == (3, 1, 8, 8) and disc.dtype == torch.float32
    assert logvar.shape == (3, 1, 1, 1)
    assert torch.equal(disc, disc_both)
    assert torch.equal(D, D_both)
    last_enc = {}
    list(net.unet.enc.values())[-1].register_forward_hook(lambda m, i, o: last_enc.update(out=o.clone()))
    with torch.no_grad():
        net(x, sigma, labels, output="disc")
    assert torch.equal(disc, last_enc["out"].mean(dim=1, keepdim=True))


def test_disc_map_is_h_over_8_for_img512_networks():
    with torch.device("meta"):
        net = Precond(**get_preset("edm2-img512-xs")["network"])
        D, disc, logvar = net(torch.empty(2, 4, 64, 64), torch.ones(2), torch.zeros(2, 1000),
                              output="both", return_logvar=True)
    assert (D.shape, disc.shape, logvar.shape) == ((2, 4, 64, 64), (2, 1, 8, 8), (2, 1, 1, 1))


def test_bad_output_mode_and_missing_logvar_head_raise():
    net = tiny_net(logvar_channels=0)
    x, sigma, labels = tiny_inputs(net)
    with pytest.raises(ValueError, match="output must be one of"):
        net(x, sigma, labels, output="logits")
    with pytest.raises(ValueError, match="logvar head"):
        net(x, sigma, labels, return_logvar=True)
    assert not any(k.startswith("logvar_") for k in net.state_dict())


def test_unconditional_network():
    net = tiny_net(label_dim=0).eval()
    x, sigma, _ = tiny_inputs(net)
    assert "unet.emb_label.weight" not in net.state_dict()
    assert torch.isfinite(net(x, sigma)).all()


# --- Precision ------------------------------------------------------------------------------------


def test_float16_falls_back_to_float32_on_cpu():
    net = tiny_net(use_fp16=True).eval()
    assert net.compute_dtype == torch.float16
    x, sigma, labels = tiny_inputs(net)
    with torch.no_grad():
        assert torch.equal(net(x, sigma, labels), net(x, sigma, labels, force_fp32=True))


def test_bfloat16_compute_is_finite_float32_and_close():
    net = tiny_net(use_fp16=False).eval()
    x, sigma, labels = tiny_inputs(net)
    with torch.no_grad():
        ref, _, _ = net(x, sigma, labels, output="both", return_logvar=True)
        net.compute_dtype = torch.bfloat16
        D, disc, logvar = net(x, sigma, labels, output="both", return_logvar=True)
        forced = net(x, sigma, labels, force_fp32=True)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in (D, disc, logvar))
    assert not torch.equal(D, ref)  # the UNet really ran in bfloat16
    assert (D - ref).abs().max() < 0.1 * ref.abs().max()
    assert torch.equal(forced, ref)


def test_float16_autocast_is_finite_float32():
    net = tiny_net(use_fp16=False).train()
    x, sigma, labels = tiny_inputs(net)
    with torch.autocast("cpu", dtype=torch.float16):
        D, disc, logvar = net(x, sigma, labels, output="both", return_logvar=True)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in (D, disc, logvar))
    (D.square().mean() + disc.mean() + logvar.mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_mpconv_casts_weights_to_input_dtype_and_keeps_gain_dtype():
    conv = MPConv(8, 4, [3, 3])
    x = torch.randn(1, 8, 5, 5, dtype=torch.bfloat16)
    assert conv(x).dtype == torch.bfloat16
    gain = torch.tensor(0.5, dtype=torch.bfloat16)
    y = conv(x.float(), gain=gain)
    # gain / sqrt(fan_in) is computed in bfloat16, the product with the fp32 weight stays fp32.
    w = normalize(conv.weight.float()) * (gain / math.sqrt(72))
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x.float(), w, padding=1), rtol=0, atol=0)


# --- Layers ---------------------------------------------------------------------------------------


def test_mp_primitives_preserve_unit_magnitude():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 200_000, generator=g)
    assert mp_silu(a).square().mean().sqrt().item() == pytest.approx(1.0, abs=0.01)
    assert mp_sum(a, b, 0.3).std().item() == pytest.approx(1.0, abs=0.01)
    cat = mp_cat(a.reshape(1000, 200), b.reshape(1000, 200)[:, :50], dim=1, t=0.3)
    assert cat.shape == (1000, 250) and cat.square().mean().sqrt().item() == pytest.approx(1.0, abs=0.01)
    w = normalize(torch.randn(6, 3, 3, 3, generator=g) * 7)
    assert torch.allclose(w.square().mean(dim=(1, 2, 3)), torch.ones(6), atol=1e-3)


def test_resample_modes():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    down = resample(x, mode="down")
    assert torch.equal(down, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert torch.equal(resample(down, mode="up")[0, 0, :2, :2], torch.full((2, 2), 2.5))
    assert resample(x, mode="keep") is x
    # A longer filter runs as a (transposed) depthwise convolution that preserves constants inside.
    const = torch.full((1, 2, 8, 8), 3.0)
    assert torch.allclose(resample(const, f=[1, 3, 3, 1], mode="down")[..., 1:-1, 1:-1], torch.tensor(3.0))
    assert torch.allclose(resample(const, f=[1, 3, 3, 1], mode="up")[..., 2:-2, 2:-2], torch.tensor(3.0))


def test_mpconv_forward_does_not_modify_weights():
    net = tiny_net().train()
    before = {k: (p.detach().clone(), p._version) for k, p in net.named_parameters()}
    x, sigma, labels = tiny_inputs(net)
    net(x, sigma, labels, output="both", return_logvar=True)
    for k, p in net.named_parameters():
        assert torch.equal(p, before[k][0]) and p._version == before[k][1], k


def test_dropout_only_in_training_mode():
    net = tiny_net(dropout=0.5)
    x, sigma, labels = tiny_inputs(net)
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(x, sigma, labels), net(x, sigma, labels))
        net.train()
        assert not torch.equal(net(x, sigma, labels), net(x, sigma, labels))


# --- Construction and the generator ---------------------------------------------------------------


def test_init_kwargs_rebuild_the_network():
    net = tiny_net()
    kwargs = json.loads(json.dumps(net.init_kwargs))
    assert kwargs == net.init_kwargs and kwargs["channel_mult"] == [1, 2]
    clone = Precond(**kwargs)
    clone.load_state_dict(net.state_dict(), strict=True)
    x, sigma, labels = tiny_inputs(net)
    with torch.no_grad():
        assert torch.equal(clone.eval()(x, sigma, labels), net.eval()(x, sigma, labels))
