"""Unit tests of sida_edm2.train.losses against values worked out by hand (plain Python / numpy float64).

Run: `python -m pytest tests/test_losses.py`
"""

import math

import numpy as np
import pytest
import torch

from sida_edm2.train import losses as L


def softplus(x):
    """log(1 + e^x) in float64: BCE-with-logits is softplus(-l) for target 1 and softplus(l) for 0."""
    return np.log1p(np.exp(np.asarray(x, dtype=np.float64)))


def lam(s):
    return (s * s + 0.25) / (0.5 * s) ** 2


def t32(values):
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# Noise levels and weights.


def test_generator_sigma_ends_and_midpoint():
    s = L.generator_sigma(t32([0.0, 0.8, 1.0, 0.5]))
    assert s.dtype == torch.float32
    hi, lo = 80 ** (1 / 7), 0.002 ** (1 / 7)
    mid = (hi + 0.5 * (lo - hi)) ** 7
    np.testing.assert_allclose(s.numpy(), [0.002, 24.41, 80.0, mid], rtol=3e-4)
    # the upper end of the generator-update range (tmax 0.8) to more digits than the documented 24.41
    expected_tmax = (hi + 0.2 * (lo - hi)) ** 7
    assert abs(expected_tmax - 24.41) < 0.01
    assert s[1].item() == pytest.approx(expected_tmax, rel=1e-5)
    assert bool((L.generator_sigma(t32([0.0, 0.2, 0.4, 0.8])).diff() > 0).all())


def test_generator_sigma_bf16_input_gives_float32():
    s = L.generator_sigma(torch.tensor([0.0, 0.5], dtype=torch.bfloat16))
    assert s.dtype == torch.float32
    assert s[0].item() == pytest.approx(0.002, rel=1e-4)


def test_fake_score_sigma_is_lognormal_map():
    s = L.fake_score_sigma(t32([0.0, 1.0, -2.0]))
    np.testing.assert_allclose(s.numpy(), [math.exp(-0.4), math.exp(0.6), math.exp(-2.4)], rtol=1e-6)
    s = L.fake_score_sigma(t32([1.0]), p_mean=0.5, p_std=2.0)
    assert s.item() == pytest.approx(math.exp(2.5), rel=1e-6)


def test_edm_weight_values():
    # (0.25 + 0.25)/0.0625 = 8, (1 + 0.25)/0.25 = 5, (4 + 0.25)/1 = 4.25
    np.testing.assert_allclose(L.edm_weight(t32([0.5, 1.0, 2.0])).numpy(), [8.0, 5.0, 4.25], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Fake-score losses.


def _dsm_case():
    # B=2, C=1, H=1, W=2. sample 0: (D - x)^2 sums to 1 + 4 = 5; sample 1: 0 + 4 = 4. u is added per
    # element, i.e. C*H*W = 2 times.
    denoised = t32([[[[1.0, 2.0]]], [[[1.0, 1.0]]]])
    x_g = t32([[[[0.0, 0.0]]], [[[1.0, 3.0]]]])
    sigma = t32([0.5, 1.0])
    u = [0.0, math.log(2.0)]
    expected = [8.0 * 5 / 1 + 0.0, 5.0 * 4 / 2 + 2 * math.log(2.0)]  # 40, 10 + 2 ln 2
    return denoised, x_g, sigma, u, expected


def test_fake_score_loss_by_hand_and_logvar_shapes():
    denoised, x_g, sigma, u, expected = _dsm_case()
    flat = L.fake_score_loss(denoised, x_g, sigma, t32(u))
    boxed = L.fake_score_loss(denoised, x_g, sigma.view(2, 1, 1, 1), t32(u).view(2, 1, 1, 1))
    assert flat.shape == boxed.shape == (2,)
    assert flat.dtype == torch.float32
    np.testing.assert_allclose(flat.numpy(), expected, rtol=1e-6)
    torch.testing.assert_close(flat, boxed)


def test_optimal_logvar_is_the_log_of_the_mean_weighted_error():
    # EDM2's convention: minimising over u gives u* = ln(lambda * mean_CHW (D - x)^2), here ln(8 * 5/2).
    denoised, x_g, sigma, _, _ = _dsm_case()
    grid = torch.linspace(0.0, 6.0, 6001)
    losses = torch.stack([L.fake_score_loss(denoised[:1], x_g[:1], sigma[:1], u.view(1))[0] for u in grid])
    assert grid[losses.argmin()].item() == pytest.approx(math.log(8.0 * 5 / 2), abs=1e-3)


def test_logvar_single_value_broadcasts_and_bad_shapes_raise():
    denoised, x_g, sigma, _, _ = _dsm_case()
    out = L.fake_score_loss(denoised, x_g, sigma, 0.0)
    np.testing.assert_allclose(out.numpy(), [40.0, 20.0], rtol=1e-6)
    torch.testing.assert_close(out, L.fake_score_loss(denoised, x_g, sigma, torch.zeros(2, 1, 1, 1)))
    with pytest.raises(ValueError, match="logvar"):
        L.fake_score_loss(denoised, x_g, sigma, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="logvar"):
        L.sid_generator_loss(x_g, denoised, x_g, torch.zeros(3))
    with pytest.raises(ValueError, match="shapes must match"):
        L.fake_score_loss(denoised, x_g[:1], sigma, 0.0)


def test_fake_score_loss_low_precision_inputs_computed_in_float32():
    denoised, x_g, sigma, u, _ = _dsm_case()  # every value is exact in bf16
    out = L.fake_score_loss(denoised.bfloat16(), x_g.bfloat16(), sigma.bfloat16(), t32(u).bfloat16())
    assert out.dtype == torch.float32
    ln2_bf16 = torch.tensor(math.log(2.0), dtype=torch.bfloat16).item()  # ln 2 is not exact in bf16
    np.testing.assert_allclose(out.numpy(), [40.0, 5.0 * 4 / math.exp(ln2_bf16) + 2 * ln2_bf16], rtol=1e-6)
    # 4 * 200^2 = 160000 overflows fp16 (max 65504): the sum must still be exact in float32
    big = torch.full((1, 1, 2, 2), 200.0, dtype=torch.float16)
    out = L.fake_score_loss(big, torch.zeros_like(big), torch.tensor([1.0], dtype=torch.float16), 0.0)
    assert out.item() == pytest.approx(5.0 * 160000.0, rel=1e-6)


def test_discriminator_loss_by_hand_and_batch_coupling():
    real = t32([[[[2.0, -1.0]]], [[[0.5, 3.0]]]])  # [B=2, 1, 1, 2]
    fake = t32([[[[-2.0, 1.0]]], [[[0.0, -0.5]]]])
    sigma, u = t32([0.5, 2.0]), t32([0.0, 1.0]).view(2, 1, 1, 1)
    bce_real = softplus(-np.array([2.0, -1.0, 0.5, 3.0])).mean()
    bce_fake = softplus(np.array([-2.0, 1.0, 0.0, -0.5])).mean()
    expected = [8.0 * (bce_real + bce_fake) / 2, 4.25 * (bce_real + bce_fake) / 2 / math.e]
    out = L.discriminator_loss(real, fake, sigma, u)
    assert out.dtype == torch.float32 and out.shape == (2,)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)
    # sample 0's value depends on sample 1's logits (micro-batch-mean BCE)
    fake2 = fake.clone()
    fake2[1] = 5.0
    assert not torch.allclose(L.discriminator_loss(real, fake2, sigma, u)[0], out[0])
    out16 = L.discriminator_loss(real.bfloat16(), fake.bfloat16(), sigma, u)
    assert out16.dtype == torch.float32
    np.testing.assert_allclose(out16.numpy(), expected, rtol=1e-6)  # logits chosen exact in bf16


# ----------------------------------------------------------------------------------------------------
# Generator losses.


def _sid_case():
    # B=2, C=1, H=1, W=2
    a = np.array([[1.0, 2.0], [0.0, -1.0]])  # D_phi
    b = np.array([[0.5, 3.0], [1.0, -1.0]])  # D_psi
    x = np.array([[0.0, 1.0], [2.0, 1.0]])  # x_g
    u = np.array([0.0, 0.5])
    w = np.abs(x - a).mean(axis=1)  # [1, 2]
    return a, b, x, u, w


def _leaf(v):
    return torch.tensor(v, dtype=torch.float32).view(2, 1, 1, 2).requires_grad_(True)


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_generator_loss_value_and_gradients(alpha):
    a, b, x, u, w = _sid_case()
    expected = ((a - b) * ((a - x) - alpha * (a - b))).sum(axis=1) / w / np.exp(u)
    # the same value written as Algorithm 1 line 14-15: (1-alpha)|a-b|^2 + (a-b).(b-x)
    alg1 = ((1 - alpha) * ((a - b) ** 2).sum(axis=1) + ((a - b) * (b - x)).sum(axis=1)) / w / np.exp(u)
    np.testing.assert_allclose(expected, alg1, rtol=1e-12)
    ta, tb, tx = _leaf(a), _leaf(b), _leaf(x)
    out = L.sid_generator_loss(ta, tb, tx, torch.tensor(u, dtype=torch.float32).view(2, 1, 1, 1), alpha=alpha)
    assert out.dtype == torch.float32 and out.shape == (2,)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-6)
    out.sum().backward()
    scale = (w * np.exp(u))[:, None]  # w detached: it contributes no gradient
    np.testing.assert_allclose(tx.grad.view(2, 2).numpy(), -(a - b) / scale, rtol=1e-6)
    np.testing.assert_allclose(
        ta.grad.view(2, 2).numpy(), ((a - x) + (1 - 2 * alpha) * (a - b)) / scale, rtol=1e-6
    )
    np.testing.assert_allclose(
        tb.grad.view(2, 2).numpy(), (-(a - x) + 2 * alpha * (a - b)) / scale, rtol=1e-6
    )


def test_sid_gradient_through_denoiser_inputs():
    # "networks" that are linear in x_g: D_phi = k1 x_g, D_psi = k2 x_g. Per element the loss is
    # (k1-k2)((k1-1) - alpha(k1-k2)) x^2 / w / e^u, so dL/dx = 2 (k1-k2)((k1-1) - alpha(k1-k2)) x / w / e^u
    # with w = mean|x - k1 x| = |1-k1| mean|x| held constant.
    k1, k2, alpha = 0.5, 0.25, 1.0
    x = np.array([[1.0, -2.0], [3.0, 0.5]])
    tx = _leaf(x)
    out = L.sid_generator_loss(k1 * tx, k2 * tx, tx, 0.0, alpha=alpha)
    out.sum().backward()
    w = abs(1 - k1) * np.abs(x).mean(axis=1, keepdims=True)
    grad = 2 * (k1 - k2) * ((k1 - 1) - alpha * (k1 - k2)) * x / w
    np.testing.assert_allclose(tx.grad.view(2, 2).numpy(), grad, rtol=1e-6)


def test_sid_normaliser_clamps_and_is_detached():
    x = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 3.0]]]], requires_grad=True)
    d = torch.tensor([[[[1.0, 2.0]]], [[[1.0, 5.0]]]])
    w = L.sid_normaliser(d, x)
    np.testing.assert_allclose(w.numpy(), [1e-5, 2.0], rtol=1e-6)
    assert not w.requires_grad
    # sample 0 has x_g == D_phi, so w = 1e-5: with D_psi = D_phi + 1 each element gives
    # -1 * (0 - (-1)) = -1, sum -2, / 1e-5 = -2e5; sample 1: gap -1, D_phi - x_g = [-2, 2] -> (1 - 3) / 2 = -1
    out = L.sid_generator_loss(d, d + 1.0, x.detach(), 0.0)
    np.testing.assert_allclose(out.numpy(), [-2e5, -1.0], rtol=1e-6)
    # x_g == D_phi == D_psi: exactly 0, where an unclamped w would give 0/0 = NaN
    assert L.sid_generator_loss(d, d, d, 0.0).tolist() == [0.0, 0.0]


def test_sid_generator_loss_bf16_inputs():
    a, b, x, u, w = _sid_case()  # exact in bf16
    out = L.sid_generator_loss(
        *(torch.tensor(v).view(2, 1, 1, 2).bfloat16() for v in (a, b, x)),
        torch.tensor(u, dtype=torch.bfloat16),
    )
    assert out.dtype == torch.float32
    expected = ((a - b) * ((a - x) - (a - b))).sum(axis=1) / w / np.exp(u)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)


def test_adversarial_generator_loss_value_clamp_and_gradient():
    logits = np.array([[15.0, 0.5], [-12.0, -1.0]])  # 15 and -12 are clamped to +-10
    a, _, x, u, w = _sid_case()
    clamped = np.clip(logits, -10, 10)
    bce = softplus(-clamped).mean()
    chw = 2
    expected = chw * bce / w / np.exp(u)
    tl = _leaf(logits)
    out = L.adversarial_generator_loss(
        tl, torch.tensor(a).view(2, 1, 1, 2), torch.tensor(x).view(2, 1, 1, 2), torch.tensor(u)
    )
    assert out.dtype == torch.float32 and out.shape == (2,)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-6)
    out.sum().backward()
    # d/dl mean softplus(-l) = -sigmoid(-l)/N, times sum_b CHW/(w_b e^u_b); zero where clamped
    sigmoid_neg = 1 / (1 + np.exp(clamped))
    grad = -sigmoid_neg / logits.size * (chw / (w * np.exp(u))).sum()
    grad[0, 0] = grad[1, 0] = 0.0
    np.testing.assert_allclose(tl.grad.view(2, 2).numpy(), grad, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Non-finite samples.


def test_finite_sum_drops_and_counts():
    v = torch.tensor([1.0, float("nan"), 2.0, float("inf"), -float("inf")], requires_grad=True)
    total, dropped = L.finite_sum(v)
    assert total.item() == 3.0 and dropped.item() == 3
    total.backward()
    assert v.grad.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    total, dropped = L.finite_sum(t32([0.5, 0.25]))
    assert total.item() == 0.75 and dropped.item() == 0


def test_nan_sample_dropped_from_per_sample_loss():
    denoised, x_g, sigma, u, expected = _dsm_case()
    x_bad = x_g.clone()
    x_bad[1, 0, 0, 1] = float("nan")
    total, dropped = L.finite_sum(L.fake_score_loss(denoised, x_bad, sigma, t32(u)))
    assert dropped.item() == 1 and total.item() == pytest.approx(expected[0], rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["real", "fake"])
def test_nonfinite_logit_drops_only_its_sample_from_the_discriminator_term(bad, which):
    """The batch-mean BCE is taken over the finite samples: the others keep the value the loss has on
    the micro-batch without the bad sample, their gradients stay finite, the bad one gets none."""
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(4, 1, 2, 2, generator=gen), torch.randn(4, 1, 2, 2, generator=gen)
    sigma, u = t32([0.5, 1.0, 2.0, 3.0]), t32([0.0, 0.5, -0.5, 1.0])
    good = [0, 2, 3]
    expected = L.discriminator_loss(real[good], fake[good], sigma[good], u[good])
    logits = {"real": real.detach().clone(), "fake": fake.detach().clone()}
    logits[which][1, 0, 1, 0] = bad
    real_bad, fake_bad = (logits[k].requires_grad_() for k in ("real", "fake"))
    out = L.discriminator_loss(real_bad, fake_bad, sigma, u)
    assert torch.isnan(out[1]) and torch.allclose(out[good], expected, rtol=1e-6, atol=0)
    total, dropped = L.finite_sum(out)
    assert dropped.item() == 1
    total.backward()
    for grad in (real_bad.grad, fake_bad.grad):
        assert torch.isfinite(grad).all() and grad[1].abs().sum() == 0 and grad[good].abs().sum() > 0


def test_nan_logit_drops_only_its_sample_from_the_adversarial_term():
    a, _, x, u, _ = _sid_case()
    a, x, u = torch.tensor(a).view(2, 1, 1, 2), torch.tensor(x).view(2, 1, 1, 2), torch.tensor(u)
    logits = torch.tensor([[[[float("nan"), 0.5]]], [[[-1.0, 2.0]]]], requires_grad=True)
    out = L.adversarial_generator_loss(logits, a, x, u)
    alone = L.adversarial_generator_loss(logits.detach()[1:], a[1:], x[1:], u[1:])
    assert torch.isnan(out[0]) and torch.equal(out[1:], alone)
    total, dropped = L.finite_sum(out)
    total.backward()
    assert dropped.item() == 1 and torch.isfinite(logits.grad).all() and logits.grad[0].abs().sum() == 0


def test_all_finite_discriminator_equals_the_whole_map_mean():
    """With every logit finite the value is the release's: one BCE mean over the whole micro-batch map."""
    gen = torch.Generator().manual_seed(1)
    real, fake = torch.randn(8, 1, 4, 4, generator=gen) * 3, torch.randn(8, 1, 4, 4, generator=gen) * 3
    sigma, u = torch.rand(8, generator=gen) + 0.1, torch.randn(8, generator=gen)
    whole = torch.nn.functional.binary_cross_entropy_with_logits(real, torch.ones_like(real))
    whole = whole + torch.nn.functional.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    release = L.edm_weight(sigma) * whole / 2 / torch.exp(u)
    torch.testing.assert_close(L.discriminator_loss(real, fake, sigma, u), release, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------
# Phases and weights.


@pytest.mark.parametrize("method", ["sida", "sid2a"])
def test_training_phase_thresholds(method):
    phase = lambda n: L.training_phase(n, 100, 200, method)  # noqa: E731
    assert phase(0) == "fake_only"
    assert phase(99_999) == "fake_only"
    assert phase(100_000) == "fake_only"  # the release: G steps only once more than 100k images were seen
    assert phase(100_001) == "sid"
    assert phase(200_000) == "sid"  # b = 0 while nimg <= 200k
    assert phase(200_001) == "sida"
    assert L.training_phase(0, 0, 0, method) == "fake_only"
    assert L.training_phase(1, 0, 0, method) == "sida"


def test_sid_method_trains_generator_from_the_start_and_never_adversarial():
    # The release has no fake-score-only warm-up without the adversarial loss.
    for nimg in (0, 99_999, 100_000, 200_000, 200_001, 10**9):
        assert L.training_phase(nimg, 100, 200, "sid") == "sid"
    with pytest.raises(ValueError, match="unknown method"):
        L.training_phase(0, 100, 200, "SiDA")


def test_generator_loss_weights():
    assert L.generator_loss_weights("sid", 100, 0.01) == (100.0, 0.0)
    assert L.generator_loss_weights("sida", 100, 0.01) == (50.0, 0.005)
    with pytest.raises(ValueError, match="fake_only"):
        L.generator_loss_weights("fake_only", 100, 0.01)
    with pytest.raises(ValueError, match="unknown phase"):
        L.generator_loss_weights("gan", 100, 0.01)
