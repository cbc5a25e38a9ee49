"""Sampling: per-seed determinism, the class / noise draw convention, few-step, EDM2's Heun sampler.

Run: .venv/bin/python -m pytest tests/test_sampling.py
"""

import math

import pytest
import torch
from helpers_sampling import tiny_net

from sida_edm2.model.networks import SIGMA_INIT, Precond
from sida_edm2.sample.sampling import (
    draw_seed_inputs,
    generate_latents,
    heun_sampler,
    karras_sigmas,
    teacher_latents,
)
from sida_edm2.sample.seeds import batches, parse_int_list, rank_slice


@pytest.fixture(scope="module")
def net() -> Precond:
    return tiny_net()


def test_parse_int_list_and_slices():
    assert parse_int_list("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    assert parse_int_list("5,5,4-6") == [5, 4, 6]
    assert len(parse_int_list("0-49999")) == 50000
    for bad in ("", "3-1", "a", "-1"):
        with pytest.raises(ValueError):
            parse_int_list(bad)
    seeds = list(range(10))
    shares = [rank_slice(seeds, r, 3) for r in range(3)]
    assert sorted(s for share in shares for s in share) == seeds
    assert batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]


def test_images_depend_only_on_seed_not_batch(net):
    seeds = [3, 11, 12, 500, 7, 0]
    whole, labels = generate_latents(net, seeds)
    parts = [generate_latents(net, chunk) for chunk in ([3], [11, 12, 500], [7, 0])]
    split = torch.cat([p[0] for p in parts])
    split_labels = torch.cat([p[1] for p in parts])
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(split_labels, labels)
    # Reordered seeds give the same per-seed images.
    shuffled, _ = generate_latents(net, seeds[::-1])
    torch.testing.assert_close(shuffled.flip(0), whole, rtol=1e-5, atol=1e-5)
    # Different seeds differ.
    assert (whole[0] - whole[1]).abs().mean() > 1e-2


def test_noise_then_class_per_seed_generator(net):
    """EDM2 / SiD draw order: a torch.Generator seeded with the seed gives z [C,H,W], then the class."""
    seed = 2**32 + 5  # wraps to 5, as the official scripts do
    noise, labels, _ = draw_seed_inputs([seed], [4, 16, 16], 10, None, "cpu")
    gen = torch.Generator("cpu").manual_seed(5)
    assert torch.equal(noise[0], torch.randn([4, 16, 16], generator=gen))
    assert labels[0].item() == torch.randint(10, size=[], generator=gen).item()
    x, _ = generate_latents(net, [seed])
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    torch.testing.assert_close(x, net(SIGMA_INIT * noise, SIGMA_INIT, onehot))


def test_given_class_keeps_the_noise(net):
    """Giving a seed the class it would have drawn reproduces the random-class image exactly."""
    seeds = [1, 2, 3]
    x_random, drawn = generate_latents(net, seeds)
    x_given, given = generate_latents(net, seeds, class_labels=drawn.tolist())
    assert torch.equal(given, drawn)
    torch.testing.assert_close(x_given, x_random)
    first = int(drawn[0])
    x_one, one = generate_latents(net, seeds, class_labels=first)
    assert one.tolist() == [first] * 3
    torch.testing.assert_close(x_one[0], x_random[0])
    with pytest.raises(ValueError):
        generate_latents(net, seeds, class_labels=[1, 2])
    with pytest.raises(ValueError):
        generate_latents(net, seeds, class_labels=10)


def test_dtype_override_is_temporary(net):
    before = net.compute_dtype
    generate_latents(net, [0], dtype=torch.float32)
    assert net.compute_dtype == before


class CountingDenoiser(torch.nn.Module):
    """Wraps a denoiser and counts its evaluations and the sigmas it saw."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.sigmas: list[float] = []
        for name in ("img_channels", "img_resolution", "label_dim"):
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def forward(self, x, sigma, class_labels=None):
        self.sigmas.append(float(torch.as_tensor(sigma).flatten()[0]))
        return self.inner(x, sigma, class_labels)


def test_few_step_renoises_with_per_seed_noise(net):
    counting = CountingDenoiser(net)
    seeds, sigmas = [8, 9], [1.0, 0.25]
    x, labels = generate_latents(counting, seeds, sigmas=sigmas, num_classes=net.label_dim)
    assert counting.sigmas == [SIGMA_INIT, 1.0, 0.25]
    # By hand: the extra noises come from each seed's generator after its z and class.
    noise, labels_ref, extra = draw_seed_inputs(seeds, [4, 16, 16], 10, None, "cpu", num_extra_noise=2)
    onehot = torch.nn.functional.one_hot(labels_ref, 10).float()
    expected = net(SIGMA_INIT * noise, SIGMA_INIT, onehot)
    for sigma, eps in zip(sigmas, extra, strict=True):
        expected = net(expected + sigma * eps, sigma, onehot)
    torch.testing.assert_close(x, expected)
    assert torch.equal(labels, labels_ref)
    # The first step alone is the one-step image.
    one_step, _ = generate_latents(net, seeds)
    torch.testing.assert_close(one_step, net(SIGMA_INIT * noise, SIGMA_INIT, onehot))
    with pytest.raises(ValueError):
        generate_latents(net, seeds, sigmas=[0.5, 1.0])
    with pytest.raises(ValueError):
        generate_latents(net, seeds, sigmas=[3.0])


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of data ~ N(mu, s0^2) per element: E[x0 | x] = mu + s0^2/(s0^2+sigma^2) (x - mu)."""

    def __init__(self, mu: float, s0: float):
        super().__init__()
        self.mu, self.s0 = mu, s0
        self.anchor = torch.nn.Parameter(torch.zeros([]))  # gives the module a device

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        x = x.to(torch.float64)
        return self.mu + self.s0**2 / (self.s0**2 + sigma**2) * (x - self.mu)


def test_karras_sigmas():
    t = karras_sigmas(32)
    assert t.shape == (33,) and t[-1] == 0
    assert math.isclose(t[0].item(), 80.0) and math.isclose(t[31].item(), 0.002, rel_tol=1e-9)
    assert torch.all(t[1:] < t[:-1])


def test_heun_makes_63_evaluations_and_solves_the_gaussian_ode():
    mu, s0 = 0.3, 0.5
    counting = CountingDenoiser(GaussianDenoiser(mu, s0))
    noise = torch.randn([4096, 1, 2, 2], generator=torch.Generator().manual_seed(0))
    x = heun_sampler(counting, noise, num_steps=32)
    assert len(counting.sigmas) == 63
    assert counting.sigmas[0] == pytest.approx(80.0) and min(counting.sigmas) == pytest.approx(0.002)
    # Exact probability-flow ODE for Gaussian data: x(s) - mu scales with sqrt(s0^2 + s^2), so the
    # answer is mu + s0/sqrt(s0^2 + 80^2) * (x_T - mu). Heun is linear here too: a per-sample constant
    # gain, within its discretisation error (1.6% at 32 steps, shrinking ~16x for 4x the steps).
    x_T = noise.double() * 80.0
    exact_gain = s0 / math.sqrt(s0**2 + 80.0**2)
    gain = (x.double() - mu) / (x_T - mu)
    assert gain.std().item() < 1e-4 * exact_gain
    assert gain.mean().item() == pytest.approx(exact_gain, rel=0.02)
    fine = heun_sampler(GaussianDenoiser(mu, s0), noise[:8], num_steps=128).double()
    fine_gain = ((fine - mu) / (x_T[:8] - mu)).mean().item()
    assert fine_gain == pytest.approx(exact_gain, rel=0.002)
    # So the samples follow the data distribution N(mu, s0^2) (up to sampling error).
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(s0, rel=0.03)


def test_heun_steps_count_in_general():
    counting = CountingDenoiser(GaussianDenoiser(0.0, 0.5))
    heun_sampler(counting, torch.randn([2, 1, 2, 2]), num_steps=5)
    assert len(counting.sigmas) == 9


def test_teacher_latents_use_the_seed_draws(net):
    counting = CountingDenoiser(net)
    seeds = [1, 2]
    x, labels = teacher_latents(counting, seeds, num_steps=3)
    assert len(counting.sigmas) == 5
    noise, labels_ref, _ = draw_seed_inputs(seeds, [4, 16, 16], 10, None, "cpu")
    onehot = torch.nn.functional.one_hot(labels_ref, 10).float()
    torch.testing.assert_close(x, heun_sampler(net, noise, onehot, num_steps=3))
    assert torch.equal(labels, labels_ref)
    # Per seed, whatever the batch (float32 rounding differs between batch shapes and grows over steps).
    x_split = torch.cat([teacher_latents(net, [s], num_steps=3)[0] for s in seeds])
    torch.testing.assert_close(x_split, x, rtol=1e-4, atol=1e-4)
