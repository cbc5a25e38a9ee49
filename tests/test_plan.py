"""Memory planner and FLOP counter (issue 7): python -m pytest tests/test_plan.py

Everything runs on the meta device (nothing is allocated) except the hand counts of single layers.
"""

import json
import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from helpers_train import make_dataset, make_teacher

import train_edm2
from sida_edm2.plan.activations import SavedTensorMeter, fused_attention_on_meta, measure_activations
from sida_edm2.plan.flops import (
    H100_SXM_BF16_DENSE_PEAK,
    PASSES,
    build_iteration_networks,
    count_forward_flops,
    count_iteration_flops,
    mfu,
)
from sida_edm2.plan.memory import (
    GIB,
    NothingFitsError,
    batch_choices,
    candidate_plans,
    main,
    predict_peak_bytes,
    recommend,
)
from sida_edm2.train.engines import enable_activation_checkpointing

XS, XXL = "edm2-img512-xs", "edm2-img512-xxl"
XXL_PARAMS = 1_523_164_773  # the official XXL Precond with logvar head
LOGVAR_PARAMS = 128  # logvar_linear.weight [1, 128]: the generator has no logvar head


def _plan(**overrides):
    """An XXL prediction: the CLI test measures the same network, so the meta-device run is shared."""
    kwargs = dict(preset_name=XXL, batch_gpu=16, gpus=8, zero_stage=2, activation_checkpointing=False,
                  teacher_partitioned=False)  # fmt: skip
    return predict_peak_bytes(**{**kwargs, **overrides})


# ----------------------------------------------------------------------------------------------------
# The saved-tensor meter.


def test_meter_equals_hand_count_for_one_conv_layer():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 8, 8)
    with SavedTensorMeter([conv], batch=2) as meter:
        conv(x)
    # Conv saves its input (for the weight gradient) and its weight, which is a parameter, not an activation.
    assert meter.saved_bytes() == 2 * 3 * 8 * 8 * 4
    assert meter.largest_activation == 2 * 3 * 8 * 8 * 4


def test_meter_counts_a_storage_once():
    net = torch.nn.Module()
    net.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    net.scale = torch.nn.Parameter(torch.ones(1, 4, 1, 1))
    x = torch.randn(2, 3, 8, 8)
    with SavedTensorMeter([net], batch=2) as meter:
        z = torch.relu(net.conv(x))  # relu saves its output z
        _ = z * net.scale  # the product saves z again (for scale's gradient) and scale (a parameter)
    assert meter.saved_bytes() == (2 * 3 * 8 * 8 + 2 * 4 * 8 * 8) * 4


def test_meter_checkpointing_terms_match_real_checkpointing():
    """kept_with_checkpointing (saved outside the blocks + block inputs) equals what autograd saves when
    the training's own activation checkpointing wraps every block of G and the fake score."""
    nets = build_iteration_networks("tiny", device="meta", dtype=torch.float32)
    modules, checkpointed = list(nets.modules()), [nets.generator, nets.fake_score]
    expected = {}
    for name, run_pass in PASSES.items():
        with SavedTensorMeter(modules, 4, checkpointed) as meter:
            run_pass(nets, 4)
        assert 0 < meter.kept_with_checkpointing() < meter.saved_bytes(), name
        assert max(meter.block_internals()) > 0, name
        expected[name] = meter.kept_with_checkpointing()
    for net in checkpointed:
        enable_activation_checkpointing(net)
    for name, run_pass in PASSES.items():
        with SavedTensorMeter(modules, 4, checkpointed=[]) as meter:
            run_pass(nets, 4)
        assert meter.saved_bytes() == expected[name], name


def test_measured_bytes_are_linear_in_the_batch():
    acts = measure_activations("tiny", "fp32")
    nets = build_iteration_networks("tiny", device="meta", dtype=torch.float32)
    for name, run_pass in PASSES.items():
        with fused_attention_on_meta(), SavedTensorMeter(list(nets.modules()), 5) as meter:
            run_pass(nets, 5)
        assert acts[name].saved.at(5) == meter.saved_bytes(), name
        assert acts[name].saved.fixed > 0 and acts[name].saved.per_image > 0  # weight copies, activations


# ----------------------------------------------------------------------------------------------------
# The memory model.


def test_terms_add_up_and_model_states_come_from_exact_parameter_counts():
    plan = _plan(zero_stage=0, gpus=1)
    assert plan.total == sum(plan.terms().values())
    assert all(value >= 0 for value in plan.terms().values())
    assert plan.phase in ("fake_score_update", "generator_update", "fake_score_step", "generator_step")
    n_g, n_f = XXL_PARAMS - LOGVAR_PARAMS, XXL_PARAMS
    assert plan.params == 2 * (n_g + n_f)  # bf16 working copies
    assert plan.master_weights == 4 * (n_g + n_f)
    assert plan.optimizer_states == 8 * (n_g + n_f)
    assert plan.ema == 4 * n_g
    assert plan.teacher == 2 * n_f


def test_ema_is_partitioned_with_the_masters_under_zero_1_and_2():
    n_g = XXL_PARAMS - LOGVAR_PARAMS
    emas = [_plan(zero_stage=stage, gpus=2).ema for stage in (0, 1, 2, 3)]
    assert emas == [4 * n_g, 2 * n_g, 2 * n_g, 4 * n_g]


def test_model_states_shrink_with_each_zero_stage():
    states = [_plan(zero_stage=stage).model_states for stage in (0, 1, 2, 3)]
    assert states[3] < states[2] < states[1] < states[0]
    assert _plan(teacher_partitioned=True).teacher == _plan().teacher // 8


def test_checkpointing_lowers_saved_tensors():
    plain, checkpointed = _plan(), _plan(activation_checkpointing=True)
    assert checkpointed.activations < plain.activations
    # MPConv weight copies are recomputed in backward, not saved (sida_edm2.model.speed): what stays batch-
    # independent is the frozen fake score's weight cache in the generator update (its convolutions, about
    # 95% of the weights, in bf16), plus with checkpointing the copies of the one block being recomputed.
    assert 1.8 * XXL_PARAMS < plain.saved_weight_copies <= checkpointed.saved_weight_copies < 2 * XXL_PARAMS
    assert checkpointed.total < plain.total


def test_bigger_batches_need_more_memory():
    totals = [_plan(batch_gpu=b).total for b in (1, 4, 16, 64)]
    assert totals == sorted(totals) and totals[0] < totals[-1]


def test_fp16_at_stage_0_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        _plan(zero_stage=0, precision="fp16")


def test_recommend_fits_the_budget_and_prefers_big_batches():
    plans = candidate_plans(XXL, gpus=8)
    best = recommend(XXL, gpus=8, gpu_memory_gib=80, plans=plans, saturating_batch=64)
    assert best.total <= 0.9 * 80 * GIB
    fitting = [p for p in plans if p.total <= 0.9 * 80 * GIB]
    # Batches beyond the saturating 64 rank alike; the larger one wins the last tie-break.
    assert min(best.batch_gpu, 64) == min(64, max(p.batch_gpu for p in fitting))
    same_batch = [p for p in fitting if p.batch_gpu == best.batch_gpu]
    # Least recomputation, then least sharding of G and the fake score, then a replicated teacher.
    cost = [(q.activation_checkpointing, q.zero_stage, q.teacher_partitioned) for q in same_batch]
    assert best == same_batch[cost.index(min(cost))]
    small = recommend(XXL, gpus=8, gpu_memory_gib=40, plans=plans)
    assert small.total <= 0.9 * 40 * GIB and small.batch_gpu < best.batch_gpu


def test_recommend_raises_a_clear_error_when_nothing_fits():
    with pytest.raises(NothingFitsError, match=r"smallest predicted peak is .* GiB"):
        recommend(XXL, gpus=1, gpu_memory_gib=40)


def test_batch_choices_divide_the_batch():
    assert batch_choices(XXL, 8) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    with pytest.raises(ValueError, match="not a multiple of 6 GPUs"):
        batch_choices(XXL, 6)


# ----------------------------------------------------------------------------------------------------
# FLOPs.


def test_xs_forward_flops_match_the_design_anchor():
    assert count_forward_flops(XS) == pytest.approx(90e9, rel=0.03)  # the release's FlopCounter count


def test_iteration_counts_forward_and_backward_of_both_updates():
    flops = count_iteration_flops("tiny", batch=2)
    assert flops.fake_score_backward > flops.fake_score_forward > flops.forward_per_image
    assert flops.generator_backward > flops.generator_forward > 2 * flops.forward_per_image
    fake_score = flops.fake_score_forward + flops.fake_score_backward
    assert flops.per_image == pytest.approx(fake_score + flops.generator_forward + flops.generator_backward)
    sid = count_iteration_flops("tiny", batch=2, method="sid")
    assert sid.per_image < flops.per_image  # no real-data discriminator pass


def test_mfu():
    assert mfu(H100_SXM_BF16_DENSE_PEAK / 4) == pytest.approx(0.25)


# ----------------------------------------------------------------------------------------------------
# The command line.


def test_cli_help_describes_every_option():
    # As a user runs it: the usage line names the module, every option is described, defaults shown.
    help_text = subprocess.run(
        [sys.executable, "-m", "sida_edm2.plan", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert help_text.startswith("Usage: python -m sida_edm2.plan [OPTIONS]")
    options = re.findall(r"^  (--[a-z-]+)", help_text, flags=re.MULTILINE)
    assert options == [
        "--preset",
        "--gpus",
        "--gpu-memory",
        "--precision",
        "--headroom",
        "--saturating-batch",
        "--help",
    ]
    blocks = re.split(r"^  (?=--)", help_text, flags=re.MULTILINE)[1:-1]
    assert all("[default:" in block or "[required]" in block for block in blocks), help_text


def test_cli_xxl_on_8_gpus():
    result = CliRunner().invoke(main, ["--preset", "edm2-img512-xxl", "--gpus", "8", "--gpu-memory", "80"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("|") == 1 + 12  # header + ZeRO 1-3 (bf16) x checkpointing x teacher placement
    assert "columns: images per GPU (--batch-gpu)" in out
    assert (
        "recommended: ZeRO-" in out and "deepspeed --num_gpus 8 train_edm2.py --preset edm2-img512-xxl" in out
    )
    total = float(out.split("  total")[1].split("GiB")[0])
    assert total <= 0.9 * 80


def test_cli_launch_command_is_accepted_by_train_edm2(tmp_path):
    result = CliRunner().invoke(main, ["--preset", "tiny", "--gpus", "2", "--gpu-memory", "1"])
    assert result.exit_code == 0, result.output
    command = result.output.strip().splitlines()[-1].split()
    assert command[:4] == ["deepspeed", "--num_gpus", "2", "train_edm2.py"]
    paths = {
        "TEACHER.pkl": str(make_teacher(tmp_path / "teacher.safetensors")),
        "LATENTS": str(make_dataset(tmp_path / "data", num_samples=8)),
        "RUN_DIR": str(tmp_path / "run"),
    }
    args = [paths.get(arg, arg) for arg in command[4:]]
    dry_run = CliRunner().invoke(train_edm2.main, [*args, "--dry-run"], env={"WORLD_SIZE": "2"})
    assert dry_run.exit_code == 0, dry_run.output
    assert json.loads(dry_run.output)["world_size"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "Invalid value for '--preset'"),
        (["--preset", "tiny", "--gpus", "0"], "Invalid value for '--gpus'"),
        (["--preset", "tiny", "--gpus", "3"], "not a multiple of 3 GPUs"),
        (["--preset", "tiny", "--gpu-memory", "-1"], "Invalid value for '--gpu-memory'"),
        (["--preset", "tiny", "--headroom", "2"], "Invalid value for '--headroom'"),
        (["--preset", "edm2-img512-xxl", "--gpu-memory", "1"], "no configuration of edm2-img512-xxl fits"),
    ],
)
def test_cli_bad_input_is_one_line(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), result.output
    assert message in result.output.strip().splitlines()[-1], result.output


def test_half_precision_candidates_skip_stage_0():
    # The training refuses bf16/fp16 at ZeRO stage 0, so the recommender must never propose it.
    assert {p.zero_stage for p in candidate_plans(XXL, gpus=8)} == {1, 2, 3}
    assert 0 in {p.zero_stage for p in candidate_plans(XXL, gpus=8, precision="fp32")}
