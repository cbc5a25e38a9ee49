"""The SiDA loop under DeepSpeed ZeRO-2 and ZeRO-3: two CPU processes over gloo, batch 8 = 2 per micro-batch
x 2 ranks x 2 accumulation rounds, five iterations that cross both phase thresholds (1 and 2 steps).

    python -m pytest tests/test_train_loop.py

Each stage runs once (a subprocess, tests/helpers_train.py's "steps" scenario); the tests below check
its report: finite losses, the two networks untouched by each other's update, the phases, and forced
weight normalisation of the fp32 master weights (with the working copy equal to them).
"""

import json
import math

import pytest
from helpers_train import make_dataset, make_teacher, run_scenario

ITERATIONS = 5
EXPECTED_PHASES = ["fake_only", "sid", "sid", "sida", "sida"]  # nimg 0 (<= 0), 8, 16 (<= 16), 24, 32


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return make_teacher(root / "teacher.safetensors"), make_dataset(root / "data")


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def report(request, assets, tmp_path_factory):
    teacher, data = assets
    out = tmp_path_factory.mktemp(f"zero{request.param}") / "report.json"
    options = dict(
        iterations=ITERATIONS, teacher=teacher, data=data, run_dir=out.parent / "run", method="sida",
        zero_stage=request.param, batch=8, batch_gpu=2, fake_only_kimg=0, sid_only_kimg=0.016,
        teacher_zero3=request.param == 3,  # under ZeRO-3 the teacher is partitioned too
    )  # fmt: skip
    run_scenario("steps", out, nproc=2, **options)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_losses_are_finite_and_nothing_skipped(report):
    stats = report["stats"]
    for name in ("loss/fake_score", "loss/discriminator", "loss/sid", "loss/adversarial"):
        assert math.isfinite(stats[name]) and stats[name] != 0.0, (name, stats)
    assert stats["skipped/samples/count"] == 0 and stats["skipped/steps/count"] == 0


@pytest.mark.slow
def test_each_update_leaves_the_other_network_bit_identical(report):
    for record in report["iterations"]:
        assert record["g_same_across_f_update"], record  # G's fp32 masters across the fake-score step
        assert record["f_same_across_g_update"], record  # the fake score's across the G step
        assert record["f_changed_by_f_update"], record


@pytest.mark.slow
def test_phases_switch_at_the_thresholds(report):
    records = report["iterations"]
    assert [r["phase"] for r in records] == EXPECTED_PHASES
    # Fake-score-only: the G update is not even computed (its engine never steps); afterwards once each.
    assert [r["g_engine_steps"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["g_changed_by_g_update"] for r in records] == [False, True, True, True, True]


@pytest.mark.slow
def test_forced_normalisation_of_master_weights(report):
    # Rows are rescaled to w / (1e-4 + rms): RMS 1/(1 + 1e-4), starting from teacher rows of RMS 3.
    assert report["max_row_rms_error"] < 2e-4
    assert report["max_working_copy_diff"] == 0.0  # fp32 run: the module computes with the masters


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_samples_are_dropped_and_their_steps_skipped(tmp_path, stage):
    """Every real latent holds a NaN: the discriminator's batch-mean BCE is NaN for every sample, so all
    of them are dropped and counted; NaN still reaches the fake score's gradients through the dropped
    branch, so each of its steps is skipped and counted (stage 0 by the loop, stage 2 by DeepSpeed),
    while G, which sees no real data, keeps training."""
    teacher = make_teacher(tmp_path / "teacher.safetensors")
    data = make_dataset(tmp_path / "data", num_samples=16, nonfinite=True)
    out = tmp_path / "report.json"
    options = dict(
        iterations=3, teacher=teacher, data=data, run_dir=tmp_path / "run", method="sida", zero_stage=stage,
        batch=8, batch_gpu=4, fake_only_kimg=0, sid_only_kimg=0.016,
    )  # fmt: skip
    run_scenario("steps", out, nproc=1, **options)
    report = json.loads(out.read_text())
    assert [r["f_changed_by_f_update"] for r in report["iterations"]] == [False] * 3
    assert [r["g_changed_by_g_update"] for r in report["iterations"]] == [False, True, True]
    assert report["stats"]["skipped/steps/count"] == 3
    assert report["stats"]["skipped/samples/count"] == 3 * 8  # the discriminator term of every sample
    assert math.isfinite(report["stats"]["loss/fake_score"]) and math.isfinite(report["stats"]["loss/sid"])
