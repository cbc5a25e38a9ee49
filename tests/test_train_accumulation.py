"""Gradient accumulation: R rounds of B samples give the update of one round of R*B, and both equal a
plain-PyTorch reference of the same loop (torch.optim.Adam, forced normalisation, EMA).

    python -m pytest tests/test_train_accumulation.py

Method `sid` (the SiD phase from the first iteration on, as the release trains it): its losses are sums
of per-sample terms, so splitting a step's samples into micro-batches only changes the order of
floating-point sums. The SiDA discriminator and adversarial terms average their BCE over each
micro-batch's whole map (paper eqs. 7, 10), so they depend on the micro-batch split by design and are
not expected to match across splits. The DeepSpeed runs are single processes (see RUNS) so that the
reference, which draws the same noise, sees the same samples.

Adam is nearly invariant to the scale of the loss (g / (sqrt(v) + eps) with eps = 1e-6), so with the
training settings a loss divided by R once too often (DeepSpeed's backward does that by default) would
go unnoticed. Here eps = 1e4 exceeds every gradient (at most ~2e3) and lr = 1, which makes each Adam step
close to lr * g / eps, proportional to the gradient: any wrong loss scale changes the weights.
"""

import copy

import pytest
import torch
from helpers_train import PRESET, make_teacher, run_scenario

from sida_edm2.io.network_files import load_network
from sida_edm2.model.networks import Precond
from sida_edm2.model.presets import get_preset
from sida_edm2.model.weight_norm import force_normalize_
from sida_edm2.train.data import LabelSampler, derived_seed, draw_step_noise
from sida_edm2.train.losses import (
    ema_beta,
    ema_update_,
    fake_score_loss,
    fake_score_sigma,
    generator_sigma,
    sid_generator_loss,
    training_phase,
)

ITERATIONS = 3  # three SiD iterations: no fake-score-only warm-up without the adversarial loss
BATCH, SEED, FAKE_ONLY_KIMG = 8, 0, 0.008
LR, ADAM_EPS = 1.0, 1e4  # see the module docstring
# name: (ZeRO stage, batch_gpu, further options). The last two runs also show that recomputing blocks in
# backward and a ZeRO-3-partitioned teacher change nothing.
RUNS = {
    "zero2_r2": (2, 4, {}),
    "zero2_r1": (2, 8, {}),
    "zero3_r2": (3, 4, {"teacher_zero3": True}),
    "zero2_r2_recompute": (2, 4, {"activation_checkpointing": True}),
}


def reference_run(teacher_path) -> dict:
    """The loop written plainly: whole step in one batch, torch Adam, force_normalize_, EMA."""
    preset = get_preset(PRESET)
    teacher = load_network(teacher_path)
    G = Precond(**{**teacher.init_kwargs, "logvar_channels": 0})
    G.load_state_dict({k: v for k, v in teacher.state_dict().items() if not k.startswith("logvar_")})
    F = copy.deepcopy(teacher).requires_grad_(True)
    force_normalize_(G)
    force_normalize_(F)
    ema = copy.deepcopy(G).requires_grad_(False)
    adam = dict(lr=LR, betas=(0.0, 0.999), eps=ADAM_EPS)
    opt_g, opt_f = torch.optim.Adam(G.parameters(), **adam), torch.optim.Adam(F.parameters(), **adam)
    noise = torch.Generator().manual_seed(derived_seed(SEED, 0, 1 << 20))  # rank 0's noise stream
    labels = LabelSampler(teacher.label_dim, None, torch.device("cpu"))
    shape = [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
    sigma_init = preset["sigma_init"]
    nimg = 0
    for _ in range(ITERATIONS):
        phase = training_phase(nimg, FAKE_ONLY_KIMG, preset["sid_only_kimg"], "sid")
        step = draw_step_noise(noise, BATCH, shape, uniform_level=False, labels=labels)
        G.eval(), F.train()
        with torch.no_grad():
            x_g = G(sigma_init * step.z, sigma_init, step.labels)
        sigma = fake_score_sigma(step.level)
        x_t = x_g + sigma.reshape(-1, 1, 1, 1) * step.eps
        denoised, logvar = F(x_t, sigma, step.labels, return_logvar=True)
        opt_f.zero_grad()
        (fake_score_loss(denoised, x_g, sigma, logvar).sum() / BATCH).backward()
        opt_f.step()
        force_normalize_(F)
        if phase != "fake_only":
            step = draw_step_noise(noise, BATCH, shape, uniform_level=True, labels=labels)
            G.train(), F.eval().requires_grad_(False)
            x_g = G(sigma_init * step.z, sigma_init, step.labels)
            sigma = generator_sigma(step.level * preset["tmax"])
            x_t = x_g + sigma.reshape(-1, 1, 1, 1) * step.eps
            d_fake, logvar = F(x_t, sigma, step.labels, return_logvar=True)
            sid = sid_generator_loss(teacher(x_t, sigma, step.labels), d_fake, x_g, logvar, preset["alpha"])
            opt_g.zero_grad()
            (preset["lambda_sid"] * sid.sum() / BATCH).backward()
            opt_g.step()
            force_normalize_(G)
            ema_update_(ema.parameters(), G.parameters(), ema_beta(nimg, BATCH, preset["ema_mimg"]))
            F.requires_grad_(True)
        nimg += BATCH
    return {
        "G": dict(G.named_parameters()),
        "F": dict(F.named_parameters()),
        "ema": dict(ema.named_parameters()),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("accumulation")
    teacher = make_teacher(root / "teacher.safetensors")
    runs = {}
    for name, (stage, batch_gpu, extra) in RUNS.items():
        out = root / f"{name}.pt"
        run_scenario(
            "weights", out, nproc=1, iterations=ITERATIONS, teacher=teacher, run_dir=root / name,
            method="sid", zero_stage=stage, batch=BATCH, batch_gpu=batch_gpu, fake_only_kimg=FAKE_ONLY_KIMG,
            seed=SEED, lr=LR, adam_eps=ADAM_EPS, **extra,
        )  # fmt: skip
        runs[name] = torch.load(out, weights_only=True)
    return runs, reference_run(teacher)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].reshape(b[k].shape) - b[k].detach()).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_deepspeed_run_matches_plain_pytorch_reference(results, name):
    runs, reference = results
    assert runs[name]["phases"] == ["sid", "sid", "sid"]
    for net in ("G", "F", "ema"):
        assert max_difference(runs[name][net], reference[net]) < 1e-6, (name, net)


@pytest.mark.slow
def test_two_rounds_of_four_equal_one_round_of_eight(results):
    runs, _ = results
    for net in ("G", "F", "ema"):
        assert max_difference(runs["zero2_r2"][net], runs["zero2_r1"][net]) < 1e-6
