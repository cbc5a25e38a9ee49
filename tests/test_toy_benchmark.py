"""The toy reproduction's pieces (benchmarks/toy_reproduction.py): the mixture, its exact denoiser, the
scores on cases whose answer is known, and the decision rules on made-up curves."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.toy_mixture import (
    ISO_STD,
    MODE_WEIGHTS,
    FrechetReference,
    MixtureDenoiser,
    MixtureScores,
    ToyMixture,
)
from benchmarks.toy_report import SCORES, decide, iterations_to_reach
from sida_edm2.sample.metrics import frechet_distance
from sida_edm2.sample.sampling import heun_sampler


@pytest.fixture(scope="module")
def mixture():
    return ToyMixture.create(num_classes=3, modes=4, shape=(2, 8, 8), seed=0)


@pytest.fixture(scope="module")
def scores(mixture):
    return MixtureScores(mixture, torch.Generator().manual_seed(7), reference_n=6000)


def test_mixture_samples_its_modes_at_their_weights(mixture):
    _, labels, comp = mixture.sample_with_modes(40000, torch.Generator().manual_seed(0))
    assert torch.equal(comp // 4, labels)
    weights = torch.bincount(comp % 4, minlength=4).double() / len(comp)
    assert torch.allclose(weights, torch.tensor(MODE_WEIGHTS, dtype=torch.float64), atol=0.01)


def test_frechet_reference_matches_the_metrics_formula(mixture):
    basis = mixture.signal_basis()
    mu, cov = mixture.class_moments(basis)[0]
    ref = FrechetReference(mu, cov)
    x, _, _ = mixture.sample_with_modes(
        3000, torch.Generator().manual_seed(1), torch.zeros(3000, dtype=torch.int64)
    )
    coords = x.reshape(len(x), -1).double() @ basis
    flat = coords.numpy()
    expected = frechet_distance(flat.mean(0), np.cov(flat, rowvar=False), mu.numpy(), cov.numpy())
    assert ref.distance(coords) == pytest.approx(expected, rel=1e-6, abs=1e-8)
    assert ref.distance(coords * 0.8) > 5 * ref.distance(coords)


def test_signal_basis_holds_the_structure_and_class_moments_are_exact(mixture):
    basis = mixture.signal_basis()
    assert basis.shape == (128, 60)  # 12 means + 48 factors, inside the 62 smooth directions
    assert torch.allclose(basis.T @ basis, torch.eye(60, dtype=torch.float64), atol=1e-10)
    x, labels, _ = mixture.sample_with_modes(40000, torch.Generator().manual_seed(3))
    coords = x.reshape(len(x), -1).double() @ basis
    for c, (mu, cov) in enumerate(mixture.class_moments(basis)):
        mine = coords[labels == c]
        assert (mine.mean(0) - mu).abs().max() < 0.06  # ~4 standard errors at 13,000 samples
        assert (torch.cov(mine.T) - cov).abs().max() < 0.04 * cov.abs().max()


def _dense_posterior_mean(mixture, x, sigma, label):
    """E[x0 | x] from full covariance matrices: the textbook formula, for comparison."""
    dim = mixture.dim
    eye = torch.eye(dim, dtype=torch.float64)
    rows = range(label * mixture.modes, (label + 1) * mixture.modes)
    logs, means = [], []
    for k in rows:
        cov = mixture.factors[k] @ mixture.factors[k].T + ISO_STD**2 * eye
        noisy = torch.distributions.MultivariateNormal(mixture.means[k], cov + sigma**2 * eye)
        logs.append(mixture.log_weights[label, k % mixture.modes] + noisy.log_prob(x))
        means.append(mixture.means[k] + cov @ torch.linalg.solve(cov + sigma**2 * eye, x - mixture.means[k]))
    w = torch.softmax(torch.stack(logs), 0)
    return (w[:, None] * torch.stack(means)).sum(0)


@pytest.mark.parametrize("sigma", [0.02, 0.3, 2.0, 40.0])
def test_exact_denoiser_matches_the_dense_posterior_mean(mixture, sigma):
    denoiser = MixtureDenoiser(mixture)
    gen = torch.Generator().manual_seed(4)
    x0, labels, _ = mixture.sample_with_modes(6, gen)
    x = x0.double() + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    got = denoiser(x, torch.tensor(sigma), onehot)
    assert got.dtype == torch.float64 and got.shape == x.shape
    for i in range(len(x)):
        want = _dense_posterior_mean(mixture, x[i].reshape(-1), sigma, int(labels[i]))
        assert torch.allclose(got[i].reshape(-1), want, atol=1e-8), (sigma, i)


def test_exact_denoiser_is_the_least_squares_estimate(mixture):
    """Monte Carlo: the conditional mean has a smaller error than any shift or rescaling of it, and
    class labels help; sigma may be a [N] tensor (the training loop's shape)."""
    denoiser = MixtureDenoiser(mixture)
    gen = torch.Generator().manual_seed(5)
    x0, labels, _ = mixture.sample_with_modes(4000, gen)
    sigma = torch.full([4000], 0.5)
    x = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=gen)
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    est = denoiser(x, sigma, onehot)
    mse = ((est - x0) ** 2).mean().item()
    for worse in (est * 1.05, est * 0.95, est + 0.02, denoiser(x, sigma, None)):
        assert ((worse - x0) ** 2).mean().item() > mse


@pytest.mark.slow  # 63 evaluations of 600 samples: a few seconds on an idle CPU
def test_heun_with_the_exact_denoiser_reaches_the_data_floor(mixture, scores):
    gen = torch.Generator().manual_seed(6)
    labels = torch.arange(600) % 3
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    sampled = heun_sampler(MixtureDenoiser(mixture), torch.randn(600, 2, 8, 8, generator=gen), onehot)
    true, _, _ = mixture.sample_with_modes(600, gen, labels)
    floor, got = scores.score(true, labels), scores.score(sampled, labels)
    assert got["cfd"] < 2 * floor["cfd"]  # the floor itself varies by +-20% at 200 samples per class
    assert abs(got["noise_var_ratio"] - 1) < 0.1
    assert got["precision"] > 0.95 and got["recall"] > floor["recall"] - 0.05


def test_scores_see_swapped_classes_dropped_modes_collapse_and_noise(mixture, scores):
    x, labels, comp = mixture.sample_with_modes(6000, torch.Generator().manual_seed(2))
    true = scores.score(x, labels)
    assert true["precision"] > 0.97 and true["recall"] > 0.95 and true["modes_covered"] == 1.0
    assert true["structure_precision"] > 0.9 and true["structure_recall"] > 0.9  # k-NN: ~0.95 at best
    assert abs(true["noise_var_ratio"] - 1) < 0.02
    swapped = scores.score(x, (labels + 1) % 3)
    assert swapped["cfd"] > 20 * true["cfd"] and swapped["precision"] < 0.01 and swapped["recall"] < 0.01
    assert swapped["structure_precision"] < 0.01 and swapped["structure_recall"] < 0.01
    keep = comp % 4 != 3  # drop every class's smallest mode (weight 0.1)
    dropped = scores.score(x[keep], labels[keep])
    assert dropped["modes_covered"] == 0.75 and dropped["recall"] < true["recall"] - 0.05  # 0.9 at most
    assert dropped["precision"] > 0.97  # what is there is right
    assert dropped["structure_recall"] < true["structure_recall"] - 0.05
    assert dropped["structure_precision"] > true["structure_precision"] - 0.02
    collapsed = scores.score(mixture.means[labels * 4].float().reshape(x.shape) + ISO_STD * 0, labels)
    assert collapsed["recall"] < 0.45 and collapsed["noise_var_ratio"] < 0.01
    assert collapsed["structure_recall"] < 0.05  # one point per class covers nothing around it
    noisy = scores.score(x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9)), labels)
    assert noisy["noise_var_ratio"] > 4 and noisy["precision"] < 0.1
    # The density scores drown in five times the true noise variance; the structure scores do not.
    assert noisy["structure_precision"] > 0.85 and noisy["structure_recall"] > 0.9


def test_iterations_to_reach_interpolates_the_crossing():
    curve = [
        {"iteration": 0, "cfd": 10.0},
        {"iteration": 4, "cfd": 6.0},
        {"iteration": 8, "cfd": 2.0},
        {"iteration": 12, "cfd": 3.0},
    ]
    assert iterations_to_reach(curve, 4.0) == pytest.approx(6.0)
    assert iterations_to_reach(curve, 10.0) == 0
    assert iterations_to_reach(curve, 1.0) is None


def _record(finals: dict[str, list[float]], reach: dict[str, list[int | None]] | None = None) -> dict:
    """A made-up record: teacher cfd 10, exact sampler 1; per variant and seed a curve from 40 at
    iteration 0 to its final value at 800, crossing 12.5 (1.25 T) at the iteration given in `reach`."""
    runs = []
    for variant, values in finals.items():
        for seed, final in enumerate(values):
            curve = [{"iteration": 0, "cfd": 40.0}]
            hit = (reach or {}).get(variant, [None] * 3)[seed]
            if hit is not None:
                curve.append({"iteration": hit, "cfd": 12.5})
            curve.append({"iteration": 800, "cfd": final})
            runs.append({"variant": variant, "seed": seed, "curve": curve, "finished": True})
    settings = {"seeds": [0, 1, 2], "iters": 800, "sid2a_iters": 400}
    return {
        "settings": settings,
        "reference": {"exact_heun_63": {"cfd": 1.0}},
        "teacher": {"heun_63": {"cfd": 10.0}},
        "runs": runs,
    }


def test_decisions_follow_the_rules_fixed_before_the_run():
    passing = {"sid-exact": [3.0, 4.0, 5.0]}  # gate level 1 + 0.5 * 9 = 5.5
    ok = decide(
        _record({**passing, "sida": [8.0, 9.0, 9.5], "sid": [15.0, 14.0, 13.0]}, {"sida": [100, 120, 90]})
    )
    assert ok["gate"] == "passes" and ok["claim1"] == "confirmed" and ok["claim2"] == "confirmed"
    ablation = decide(_record({**passing, "sida-psi": [8.0, 13.0, 9.0]}, {"sida-psi": [100, None, 200]}))
    assert ablation["ablation_seeds_below"] == 2 and ablation["ablation_iterations_to_1.25T"]["1"] is None
    refuted = decide(
        _record({**passing, "sida": [11.0, 12.0, 9.0], "sid": [9.0, 9.0, 9.0]}, {"sid": [100] * 3})
    )
    assert refuted["claim1"] == "refuted" and refuted["claim2"] == "refuted"
    failing = {"sid-exact": [3.0, 4.0, 6.0]}
    gated = decide(
        _record({**failing, "sida": [11.0, 12.0, 9.0], "sid": [9.0, 9.0, 9.0]}, {"sid": [100] * 3})
    )
    assert (
        gated["gate"] == "fails" and gated["claim1"] == "inconclusive" and gated["claim2"] == "inconclusive"
    )
    mixed = decide(_record({**passing, "sida": [8.0, 12.0, 9.0]}))
    assert mixed["claim1"] == "inconclusive" and mixed["claim2"] == "incomplete"
    unfinished = _record({**passing, "sida": [8.0, 9.0, 9.5]})
    unfinished["runs"][-1]["finished"] = False
    assert decide(unfinished)["claim1"] == "incomplete"


def test_decisions_on_sid2a_compare_with_sids_own_pace():
    record = _record({"sid-exact": [3.0] * 3, "sid": [20.0] * 3, "sid2a": [12.0, 14.0, 15.0]})
    for run in record["runs"]:  # SiD at 400 iterations: 21, i.e. it still improves 5% per 400
        if run["variant"] == "sid":
            run["curve"].insert(-1, {"iteration": 400, "cfd": 21.0})
    assert decide(record)["claim3"] == "confirmed"
    slow = copy.deepcopy(record)
    for run in slow["runs"]:
        if run["variant"] == "sid2a":
            run["curve"][-1]["cfd"] = 19.5  # 2.5% better: slower than SiD's own 5%
    assert decide(slow)["claim3"] == "refuted"


TRAINER_WITH_EXACT_TEACHER = """
import json, sys, torch
sys.path.insert(0, ".")
from benchmarks.toy_mixture import MixtureDenoiser, ToyMixture
from sida_edm2.train.config import resolve_config
from sida_edm2.train.trainer import Trainer
from tests.helpers_train import make_teacher

class Counted(MixtureDenoiser):
    calls = []
    def forward(self, x, sigma, class_labels=None):
        Counted.calls.append([list(x.shape), list(torch.as_tensor(sigma).shape), list(class_labels.shape)])
        return super().forward(x, sigma, class_labels)

out = sys.argv[1]
teacher_file = make_teacher(__import__("pathlib").Path(out) / "teacher.safetensors")
cfg = resolve_config("tiny", run_dir=out + "/run", method="sid", teacher=str(teacher_file), fake_only_kimg=0,
                     sid_only_kimg=0, external_data=True)
exact = Counted(ToyMixture.create(num_classes=10, shape=(4, 16, 16)))
trainer = Trainer(cfg, teacher=exact)
before = {k: v.clone() for k, v in trainer.engine_g.module.state_dict().items()}
trainer.run_iteration()
moved = any(not torch.equal(before[k], v) for k, v in trainer.engine_g.module.state_dict().items())
print(json.dumps({"calls": Counted.calls, "is_given": trainer.teacher is exact, "g_moved": moved}))
"""


@pytest.mark.slow  # one SiD iteration of the tiny preset in its own process group
def test_trainer_takes_the_exact_denoiser_as_its_teacher(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", TRAINER_WITH_EXACT_TEACHER, str(tmp_path)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["is_given"] and result["g_moved"]
    assert result["calls"] and all(
        shape[0][1:] == [4, 16, 16] and shape[2][1] == 10 for shape in result["calls"]
    )


def test_report_from_a_partly_done_folder_and_a_settings_mismatch_refused(tmp_path):
    """The report reads whatever --out holds (a student started but not scored yet, nothing finished),
    and a second call with other settings is refused before any job starts."""
    from click.testing import CliRunner

    from benchmarks.toy_report import write_report
    from benchmarks.toy_reproduction import main, settings_from

    runner = CliRunner()
    args = ["--out", str(tmp_path), "--quick", "--time-budget-s", "0"]  # no time: nothing starts
    assert runner.invoke(main, args).exit_code == 0
    settings = json.loads((tmp_path / "settings.json").read_text())
    (tmp_path / "runs" / "sid-s0").mkdir(parents=True)
    (tmp_path / "runs" / "sid-s0" / "curve.jsonl").write_text("")
    (tmp_path / "runs" / "sida-s0").mkdir()
    point = {"iteration": 0, "kimg": 0.0, **dict.fromkeys(SCORES, 0.5)}
    (tmp_path / "runs" / "sida-s0" / "curve.jsonl").write_text(json.dumps(point) + "\n")
    table = write_report(tmp_path, settings)
    assert "| SiDA (at iterations 0) | 1 | 0/1 |" in table and "- claim1: incomplete" in table
    refused = runner.invoke(main, [*args, "--lr", "1e-3"])
    assert refused.exit_code == 2 and "holds a run with other settings" in refused.output
    for bad in (["--seeds", "a,b"], ["--variants", "sid,sidx"], ["--variants", "sid2a"]):
        usage = runner.invoke(main, ["--out", str(tmp_path / "other"), *bad])
        assert usage.exit_code == 2 and bad[0] in usage.output
    assert settings_from({**settings_defaults(), "seeds": "0,1"}, quick=False)["seeds"] == [0, 1]


def settings_defaults() -> dict:
    """Every option of the command at its default (what click passes to settings_from)."""
    from benchmarks.toy_reproduction import main

    return {p.name: p.default for p in main.params if p.name not in ("out", "quick", "worker", "deadline")}
