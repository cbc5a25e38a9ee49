"""Forced weight normalisation: once per optimizer step, never between forwards sharing a backward.

Run: .venv/bin/python -m pytest tests/test_weight_norm.py
"""

import pytest
import torch

from sida_edm2.model.mp_layers import MPConv
from sida_edm2.model.networks import Precond
from sida_edm2.model.presets import get_preset
from sida_edm2.model.weight_norm import ForcedWeightNorm, force_normalize_, mp_weight_params, normalize_rows_


def make_net() -> Precond:
    torch.manual_seed(0)
    net = Precond(**get_preset("tiny")["network"], use_fp16=False)
    with torch.no_grad():  # non-zero gains so every weight gets a gradient
        for name, p in net.named_parameters():
            if name.endswith("_gain"):
                p.fill_(1.0)
    return net.train()


def batch(net: Precond, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    sigma = torch.tensor([0.5, 3.0])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 4]), net.label_dim).float()
    return x, sigma, labels


def row_rms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().flatten(1).square().mean(dim=1).sqrt()


def rows_at_unit_rms(net: torch.nn.Module) -> bool:
    return all(torch.allclose(row_rms(p), torch.ones(len(p)), atol=1e-3) for _, p in mp_weight_params(net))


def sida_fake_score_pass(net: Precond, real, fake):
    """The SiDA fake-score update: DSM on fakes ('both') and the discriminator on real inputs ('disc')
    before a single backward."""
    x_fake, sigma, labels = fake
    x_real = real[0]
    D, disc_fake, logvar = net(x_fake, sigma, labels, output="both", return_logvar=True)
    disc_real = net(x_real, sigma, labels, output="disc")
    loss = (D - x_fake).square().mean() + logvar.mean() + disc_fake.mean() - disc_real.mean()
    loss.backward()


def test_mp_weight_params_lists_every_mpconv_weight_only():
    net = make_net()
    params = mp_weight_params(net)
    assert len(params) == sum(isinstance(m, MPConv) for m in net.modules())
    names = [n for n, _ in params]
    assert "unet.enc.16x16_conv.weight" in names and "logvar_linear.weight" in names
    assert not any(n.endswith("_gain") for n in names)
    own = dict(net.named_parameters())
    assert all(own[n] is p for n, p in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_rows_sets_rms_one_in_place(dtype):
    w = (torch.randn(5, 3, 3, 3) * torch.tensor([0.1, 1, 3, 10, 100])[:, None, None, None]).to(dtype)
    rms = row_rms(w)
    ptr = w.data_ptr()
    out = normalize_rows_(w)
    assert out is w and w.data_ptr() == ptr and w.dtype == dtype
    # w / (1e-4 + rms): the epsilon keeps small rows slightly below 1.
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(row_rms(w), rms / (1e-4 + rms), rtol=tol, atol=tol)


def test_rows_at_unit_rms_after_each_adam_step_and_normalised_once_per_step():
    net = make_net()
    fwn = ForcedWeightNorm(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.0, 0.999), eps=1e-6)
    assert not rows_at_unit_rms(net)  # randn init: rows have RMS ~1 but not exactly
    for step in range(3):
        sida_fake_score_pass(net, batch(net, 2 * step), batch(net, 2 * step + 1))
        assert rows_at_unit_rms(net)  # normalised before this step's first forward...
        assert fwn.num_normalizations == step + 1  # ...and only once although the net ran twice
        opt.step()
        opt.zero_grad()
        assert not rows_at_unit_rms(net)  # Adam moved the weights off the unit sphere
        fwn.step()
    net(*batch(net, 9))
    assert rows_at_unit_rms(net) and fwn.num_normalizations == 4


def test_two_forwards_one_backward_with_hook_does_not_raise():
    net = make_net()
    fwn = ForcedWeightNorm(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.0, 0.999))
    for step in range(2):
        sida_fake_score_pass(net, batch(net, step), batch(net, step + 10))
        assert all(torch.isfinite(p.grad).all() for _, p in mp_weight_params(net))
        opt.step()
        opt.zero_grad()
        fwn.step()
    assert fwn.num_normalizations == 2


def test_in_place_normalisation_between_two_forwards_raises():
    """The defect of the release's per-forward hook (DESIGN 3.2): normalising the stored weights between
    two forwards that share one backward invalidates tensors saved by the first forward."""
    net = make_net()
    x, sigma, labels = batch(net, 0)
    first = net(x, sigma, labels, output="both")[0]
    force_normalize_(net)
    second = net(batch(net, 1)[0], sigma, labels, output="disc")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (first.mean() + second.mean()).backward()


def test_disabled_or_eval_mode_leaves_weights_alone():
    net = make_net()
    fwn = ForcedWeightNorm(net, enabled=False)
    before = [p.detach().clone() for _, p in mp_weight_params(net)]
    net(*batch(net, 0))
    net.eval()
    fwn.enabled = True
    with torch.no_grad():
        net(*batch(net, 0))
    assert all(torch.equal(b, p) for b, (_, p) in zip(before, mp_weight_params(net), strict=True))
    assert fwn.num_normalizations == 0
    net.train()
    net(*batch(net, 0))
    assert fwn.num_normalizations == 1 and rows_at_unit_rms(net)
    fwn.remove()
    fwn.step()
    with torch.no_grad():
        for _, p in mp_weight_params(net):
            p.mul_(2)
    net(*batch(net, 0))
    assert fwn.num_normalizations == 1 and not rows_at_unit_rms(net)
