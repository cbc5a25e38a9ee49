"""Gradient accumulation: R rounds of B samples give the update of one round of R*B, and both equal a
plain-PyTorch reference of the same loop (torch.optim.Adam, forced normalisation, EMA).

    python -m pytest tests/test_train_accumulation.py

Method `sid` (the SiD phase from the first iteration on, as the release trains it): its losses are sums
of per-sample terms, so splitting a step's samples into micro-batches only changes the order of
floating-point sums. The SiDA discriminator and adversarial terms average their BCE over each
micro-batch's whole map (paper eqs. 7, 10), so they depend on the micro-batch split by design and are
not expected to match across splits: the `sida` run (fake score only, SiD, then SiDA with the
discriminator and adversarial terms on real latents) is compared with a reference that accumulates the
same micro-batches, read by the same reader. The DeepSpeed runs are single processes (see RUNS) so that
the reference, which draws the same noise, sees the same samples.

Adam is nearly invariant to the scale of the loss (g / (sqrt(v) + eps) with eps = 1e-6), so with the
training settings a loss divided by R once too often (DeepSpeed's backward does that by default) would
go unnoticed. Here eps = 1e4 exceeds every gradient (at most ~2e3) and lr = 1, which makes each Adam step
close to lr * g / eps, proportional to the gradient: any wrong loss scale changes the weights.
"""

import copy

import pytest
import torch
from helpers_train import PRESET, make_dataset, make_teacher, run_scenario

from latent.reader import read_manifest
from sida_edm2.io.network_files import load_network
from sida_edm2.model.networks import Precond
from sida_edm2.model.presets import get_preset
from sida_edm2.model.weight_norm import force_normalize_
from sida_edm2.train.data import LabelSampler, derived_seed, draw_step_noise, open_real_data
from sida_edm2.train.ema import ema_beta, ema_update_
from sida_edm2.train.losses import (
    adversarial_generator_loss,
    discriminator_loss,
    fake_score_loss,
    fake_score_sigma,
    generator_loss_weights,
    generator_sigma,
    sid_generator_loss,
    training_phase,
)

ITERATIONS = 3  # sid: three SiD iterations (no warm-up without the adversarial loss); sida: see PHASES
BATCH, SEED, FAKE_ONLY_KIMG = 8, 0, 0.008
SIDA_PHASES = dict(fake_only_kimg=0, sid_only_kimg=0.008)  # sida: fake score only, SiD, then SiDA
LR, ADAM_EPS = 1.0, 1e4  # see the module docstring
# name: (method, ZeRO stage, batch_gpu, further options). zero3 and recompute also show that recomputing
# blocks in backward and a ZeRO-3-partitioned teacher change nothing; the sida runs cover the
# discriminator and adversarial terms, against a reference with the same micro-batches.
RUNS = {
    "zero2_r2": ("sid", 2, 4, {}),
    "zero2_r1": ("sid", 2, 8, {}),
    "zero3_r2": ("sid", 3, 4, {"teacher_zero3": True}),
    "zero2_r2_recompute": ("sid", 2, 4, {"activation_checkpointing": True}),
    "sida_zero2_r2": ("sida", 2, 4, SIDA_PHASES),
}
EXPECTED_PHASES = {"sid": ["sid", "sid", "sid"], "sida": ["fake_only", "sid", "sida"]}


def reference_run(teacher_path, method: str, data=None, batch_gpu: int = BATCH) -> dict:
    """The loop written plainly: torch Adam, force_normalize_, EMA. Method "sid" takes each step as one
    batch; "sida" (real data, the discriminator and adversarial terms, whose BCE averages over a
    micro-batch) accumulates micro-batches of `batch_gpu` as the training does."""
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
    real = None
    counts = None
    if method != "sid":  # rank 0's reader of segment 0, the one the training reads until a checkpoint
        reader = open_real_data(str(data), batch_gpu, rank=0, world_size=1, seed=SEED, segment=0,
                                num_workers=0)
        real = iter(reader)
        counts = read_manifest(data)["class_counts"]
    phases = SIDA_PHASES if method != "sid" else dict(fake_only_kimg=FAKE_ONLY_KIMG, sid_only_kimg=0.016)
    labels = LabelSampler(teacher.label_dim, counts, torch.device("cpu"))
    shape = [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
    sigma_init, rounds = preset["sigma_init"], BATCH // batch_gpu
    nimg = 0
    for _ in range(ITERATIONS):
        phase = training_phase(nimg, phases["fake_only_kimg"], phases["sid_only_kimg"], method)
        step = draw_step_noise(noise, BATCH, shape, uniform_level=False, labels=None if real else labels)
        G.eval(), F.train()
        opt_f.zero_grad()
        for r in range(rounds):
            part = step.micro_batch(r, batch_gpu)
            x_real, c = next(real) if real else (None, part.labels)
            with torch.no_grad():
                x_g = G(sigma_init * part.z, sigma_init, c)
            sigma = fake_score_sigma(part.level)
            s = sigma.reshape(-1, 1, 1, 1)
            denoised, logits_fake, logvar = F(x_g + s * part.eps, sigma, c, return_logvar=True, output="both")
            loss = fake_score_loss(denoised, x_g, sigma, logvar).sum()
            if real:
                logits_real = F(x_real + s * part.eps, sigma, c, output="disc")
                disc = discriminator_loss(logits_real, logits_fake, sigma, logvar)
                loss = loss + preset["lambda_adv_psi"] * disc.sum()
            (loss / BATCH).backward()
        opt_f.step()
        force_normalize_(F)
        if phase != "fake_only":
            w_sid, w_adv = generator_loss_weights(phase, preset["lambda_sid"], preset["lambda_adv_theta"])
            step = draw_step_noise(noise, BATCH, shape, uniform_level=True, labels=labels)
            G.train(), F.eval().requires_grad_(False)
            opt_g.zero_grad()
            for r in range(rounds):
                part = step.micro_batch(r, batch_gpu)
                x_g = G(sigma_init * part.z, sigma_init, part.labels)
                sigma = generator_sigma(part.level * preset["tmax"])
                x_t = x_g + sigma.reshape(-1, 1, 1, 1) * part.eps
                d_fake, logits, logvar = F(x_t, sigma, part.labels, return_logvar=True, output="both")
                d_teacher = teacher(x_t, sigma, part.labels)
                loss = w_sid * sid_generator_loss(d_teacher, d_fake, x_g, logvar, preset["alpha"]).sum()
                if w_adv:
                    loss = loss + w_adv * adversarial_generator_loss(logits, d_teacher, x_g, logvar).sum()
                (loss / BATCH).backward()
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
    data = make_dataset(root / "data")
    runs = {}
    for name, (method, stage, batch_gpu, extra) in RUNS.items():
        out = root / f"{name}.pt"
        options = dict(data=data) if method == "sida" else dict(fake_only_kimg=FAKE_ONLY_KIMG)
        run_scenario(
            "weights", out, nproc=1, iterations=ITERATIONS, teacher=teacher, run_dir=root / name,
            method=method, zero_stage=stage, batch=BATCH, batch_gpu=batch_gpu, seed=SEED, lr=LR,
            adam_eps=ADAM_EPS, **options, **extra,
        )  # fmt: skip
        runs[name] = torch.load(out, weights_only=True)
    references = {"sid": reference_run(teacher, "sid"), "sida": reference_run(teacher, "sida", data, 4)}
    return runs, references


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].reshape(b[k].shape) - b[k].detach()).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_deepspeed_run_matches_plain_pytorch_reference(results, name):
    runs, references = results
    method = RUNS[name][0]
    assert runs[name]["phases"] == EXPECTED_PHASES[method]
    for net in ("G", "F", "ema"):
        assert max_difference(runs[name][net], references[method][net]) < 1e-6, (name, net)


@pytest.mark.slow
def test_two_rounds_of_four_equal_one_round_of_eight(results):
    runs, _ = results
    for net in ("G", "F", "ema"):
        assert max_difference(runs["zero2_r2"][net], runs["zero2_r1"][net]) < 1e-6
