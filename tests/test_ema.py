"""The EMA schedule and update of sida_edm2.train.ema against values worked out by hand."""

import pytest
import torch

from sida_edm2.train.ema import ema_beta, ema_update_


def t32(values):
    return torch.tensor(values, dtype=torch.float32)


def test_ema_beta_schedule():
    assert ema_beta(0, 2048) == 0.0  # halflife floored at 1e-8: the EMA copies the weights
    assert ema_beta(1_000_000, 2048) == pytest.approx(0.5 ** (2048 / 50_000), rel=1e-12)  # ramp-up
    assert ema_beta(40_000_000, 2048) == pytest.approx(0.5 ** (2048 / 2e6), rel=1e-12)  # both 2e6
    assert ema_beta(10**9, 2048) == pytest.approx(0.5 ** (2048 / 2e6), rel=1e-12)  # capped
    assert ema_beta(0, 64, ema_mimg=0.5, rampup=None) == pytest.approx(0.5 ** (64 / 5e5), rel=1e-12)


def test_ema_update():
    ema = [t32([1.0, 2.0]), t32([[4.0]])]
    params = [t32([3.0, 6.0]), torch.tensor([[8.0]], dtype=torch.bfloat16)]
    ema_update_(ema, params, 0.25)
    assert ema[0].tolist() == [2.5, 5.0]  # 0.25*1 + 0.75*3, 0.25*2 + 0.75*6
    assert ema[1].dtype == torch.float32 and ema[1].item() == 7.0
    ema_update_(ema, [t32([0.1, 0.2]), t32([[0.3]])], 0.0)
    assert ema[0].tolist() == t32([0.1, 0.2]).tolist() and ema[1].item() == t32([0.3]).item()
    with pytest.raises(ValueError):
        ema_update_(ema, params[:1], 0.5)
