"""Forced weight normalisation of stored weights: rows at unit RMS, in place, and why never between two
forwards that share a backward (the training normalises the master weights after each step instead).

Run: .venv/bin/python -m pytest tests/test_weight_norm.py
"""

import pytest
import torch

from sida_edm2.model.mp_layers import MPConv
from sida_edm2.model.networks import Precond
from sida_edm2.model.presets import get_preset
from sida_edm2.model.weight_norm import force_normalize_, mp_weight_params, normalize_rows_


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


def test_in_place_normalisation_between_two_forwards_raises():
    """The defect of the release's per-forward hook (docs/ARCHITECTURE.md, "Known traps"): normalising the
    stored weights between two forwards that share one backward invalidates tensors saved by the first."""
    net = make_net()
    x, sigma, labels = batch(net, 0)
    first = net(x, sigma, labels, output="both")[0]
    force_normalize_(net)
    second = net(batch(net, 1)[0], sigma, labels, output="disc")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (first.mean() + second.mean()).backward()
