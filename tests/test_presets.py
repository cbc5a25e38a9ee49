"""Presets: exact EDM2 parameter counts, paper Table 7 settings, tiny/demo networks, get_preset.

Run: .venv/bin/python -m pytest tests/test_presets.py
"""

import json

import pytest
import torch

from sida_edm2.model.networks import Precond
from sida_edm2.model.presets import PRESETS, get_preset

# Parameters of the official img512 networks (1000 classes, with the logvar head).
PARAM_COUNTS = {
    "edm2-img512-xs": 124_713_253,
    "edm2-img512-s": 280_212_837,
    "edm2-img512-m": 497_807_781,
    "edm2-img512-l": 777_498_085,
    "edm2-img512-xl": 1_119_283_749,
    "edm2-img512-xxl": 1_523_164_773,
}
# size: (model_channels, dropout, batch_gpu), EDM2 and paper Table 7.
SIZES = {
    "xs": (128, 0.0, 64), "s": (192, 0.0, 64), "m": (256, 0.1, 32),
    "l": (320, 0.1, 32), "xl": (384, 0.1, 16), "xxl": (448, 0.1, 2),
}


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_parameter_count_matches_edm2(name):
    with torch.device("meta"):
        net = Precond(**get_preset(name)["network"])
    assert sum(p.numel() for p in net.parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("size", list(SIZES))
def test_img512_presets_follow_table_7(size):
    cfg = get_preset(f"edm2-img512-{size}")
    channels, dropout, batch_gpu = SIZES[size]
    net = cfg["network"]
    assert (net["img_resolution"], net["img_channels"], net["label_dim"]) == (64, 4, 1000)
    assert net["model_channels"] == channels and net["dropout"] == cfg["dropout"] == dropout
    assert cfg["batch"] == 2048 and cfg["batch_gpu"] == batch_gpu
    assert cfg["batch"] == cfg["batch_gpu"] * cfg["paper_num_gpus"] * cfg["paper_accum_rounds"]
    assert cfg["lr"] == 5e-5 and cfg["adam_betas"] == [0.0, 0.999] and cfg["adam_eps"] == 1e-6
    assert (cfg["lambda_sid"], cfg["lambda_adv_theta"], cfg["lambda_adv_psi"]) == (100, 0.01, 100)
    assert cfg["alpha"] == 1.0 and cfg["ema_mimg"] == 2.0 and cfg["sigma_init"] == 2.5 and cfg["tmax"] == 0.8
    assert (cfg["fake_only_kimg"], cfg["sid_only_kimg"]) == (100, 200) and cfg["force_norm"] is True


def test_paper_accumulation_rounds():
    rounds = [PRESETS[f"edm2-img512-{s}"]["paper_accum_rounds"] for s in SIZES]
    assert rounds == [2, 4, 8, 8, 16, 128]


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_small_presets_build_and_run_on_cpu(name):
    cfg = get_preset(name)
    assert set(cfg) == set(PRESETS["edm2-img512-xs"])  # same keys as the real presets
    assert cfg["network"]["label_dim"] == 10 and cfg["network"]["img_channels"] == 4
    assert cfg["batch"] % cfg["batch_gpu"] == 0 and cfg["fake_only_kimg"] < cfg["sid_only_kimg"]
    net = Precond(**cfg["network"]).eval()
    R = cfg["network"]["img_resolution"]
    levels = len(cfg["network"]["channel_mult"])
    x = torch.randn(cfg["batch_gpu"], 4, R, R)
    labels = torch.nn.functional.one_hot(torch.arange(cfg["batch_gpu"]) % 10, 10).float()
    with torch.no_grad():
        D, disc = net(x, torch.ones(cfg["batch_gpu"]), labels, output="both")
    assert D.shape == x.shape
    assert disc.shape == (cfg["batch_gpu"], 1, R >> (levels - 1), R >> (levels - 1))
    assert any(k.endswith("attn_qkv.weight") for k in net.state_dict())  # attention is exercised


def test_presets_are_json_data():
    assert json.loads(json.dumps(PRESETS)) == PRESETS


def test_get_preset_returns_deep_copy():
    cfg = get_preset("edm2-img512-m")
    cfg["network"]["model_channels"] = 1
    cfg["lr"] = 1.0
    assert PRESETS["edm2-img512-m"]["network"]["model_channels"] == 256
    assert PRESETS["edm2-img512-m"]["lr"] == 5e-5


def test_get_preset_unknown_name_lists_valid_names():
    with pytest.raises(KeyError, match=r"edm2-img512-xs.*tiny.*demo"):
        get_preset("edm2-img512-xss")


def test_weight_recompute_follows_the_preset():
    # Recomputing normalised weights saves memory but costs speed: on only for the sizes memory limits.
    from sida_edm2.train.config import resolve_config

    recompute = {size: get_preset(f"edm2-img512-{size}")["weight_recompute"] for size in ("xs", "m", "xxl")}
    assert recompute == {"xs": False, "m": False, "xxl": True}
    kwargs = dict(run_dir="runs/x", teacher="t.safetensors", external_data=True)
    assert resolve_config("edm2-img512-xs", **kwargs).weight_recompute is False
    assert resolve_config("edm2-img512-xxl", **kwargs).weight_recompute is True
    assert resolve_config("edm2-img512-xxl", weight_recompute=False, **kwargs).weight_recompute is False
