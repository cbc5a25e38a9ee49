"""train_edm2.py's clear errors and --dry-run, and the configuration pieces behind them (in-process: every
case here fails or exits before a process group or DeepSpeed engine exists).

    python -m pytest tests/test_train_cli.py
"""

import json

import pytest
from click.testing import CliRunner
from helpers_train import cli_args, make_dataset, make_teacher

import train_edm2
from sida_edm2.train.config import ConfigError, resolve_config
from sida_edm2.train.engines import DS_CONFIG_DIR, build_ds_config, load_ds_config
from sida_edm2.train.run_checkpoints import check_resume_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return make_teacher(root / "teacher.safetensors"), make_dataset(root / "data", num_samples=16)


def invoke(args: list[str]):
    return CliRunner().invoke(train_edm2.main, args, catch_exceptions=False)


def test_dry_run_prints_resolved_configuration(assets, tmp_path):
    teacher, data = assets
    result = invoke([*cli_args(teacher, tmp_path / "run", data, batch_gpu=2, lr=1e-4), "--dry-run"])
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output)
    assert resolved["preset"] == "tiny" and resolved["method"] == "sida"
    assert resolved["lr"] == 1e-4  # the command line wins
    assert resolved["lambda_adv_psi"] == 100.0 and resolved["adam_betas"] == [0.0, 0.999]  # from the preset
    assert resolved["batch"] == 8 and resolved["accumulation_rounds"] == 4 and resolved["world_size"] == 1
    assert resolved["resolved_precision"] == "fp32"  # no GPU here
    assert resolved["deepspeed"]["zero_optimization"]["stage"] == 2
    assert resolved["deepspeed"]["gradient_accumulation_steps"] == 4
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"batch": 10, "batch_gpu": 4}, "not divisible by --batch-gpu 4"),
        ({"method": "sid2a"}, "--init-generator"),
        ({"zero_stage": 3, "precision": "fp16"}, "fp16 needs a GPU"),
        ({"zero_stage": 0, "precision": "bf16"}, "stage 0 supports fp32 only"),
        ({"method": "edm2"}, "trains a teacher from scratch: no --teacher"),
    ],
)
def test_clear_errors_for_bad_flags(assets, tmp_path, flags, message):
    teacher, data = assets
    result = invoke(cli_args(teacher, tmp_path / "run", data, **flags))
    assert result.exit_code == 2 and message in result.output, result.output


def test_clear_errors_for_missing_inputs(assets, tmp_path):
    teacher, data = assets
    result = invoke(cli_args(tmp_path / "nope.safetensors", tmp_path / "run", data))
    assert result.exit_code == 2 and "nope.safetensors does not exist" in result.output
    result = invoke(cli_args(teacher, tmp_path / "run"))  # sida without --data
    assert result.exit_code == 2 and "pass --data" in result.output
    result = invoke(cli_args(teacher, tmp_path / "run", tmp_path))  # a directory without manifest
    assert result.exit_code == 2 and "not a latent dataset" in result.output


def test_clear_error_for_unwritable_run_dir(assets, tmp_path):
    teacher, data = assets
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = invoke(cli_args(teacher, blocker / "run", data))
    assert result.exit_code == 2 and "not writable" in result.output


def test_clear_error_for_teacher_of_another_architecture(assets, tmp_path):
    teacher, data = assets
    args = cli_args(teacher, tmp_path / "run", data)
    args[args.index("tiny")] = "demo"  # the demo preset has another architecture (and batch 32)
    result = CliRunner().invoke(train_edm2.main, args)
    assert result.exit_code == 2
    assert "does not have the architecture of preset 'demo'" in result.output, result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ds_config_derives_batch_sizes_and_precision():
    cfg = build_ds_config(load_ds_config(2), batch_gpu=4, rounds=3, world_size=2, precision="bf16")
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 24
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling when fp16 is chosen
    with pytest.raises(ConfigError, match="derived from --batch"):
        build_ds_config({**load_ds_config(1), "train_batch_size": 8}, batch_gpu=4, rounds=1, world_size=2,
                        precision="fp32")  # fmt: skip
    with pytest.raises(ConfigError, match="gradient_clipping needs"):
        build_ds_config({**load_ds_config(2), "gradient_clipping": 1.0}, batch_gpu=4, rounds=1, world_size=1,
                        precision="bf16")  # fmt: skip
    with pytest.raises(ConfigError, match="ZeRO stage 1 but --zero-stage is 3"):
        load_ds_config(3, path=str(DS_CONFIG_DIR / "zero1.json"))


def test_resume_refuses_another_batch_or_world_size(tmp_path):
    saved = {**resolve_config("tiny", tmp_path, teacher="t", data="d").to_dict(), "world_size": 2}
    current = {**saved, "max_kimg": 10.0}
    assert check_resume_config(saved, current) == ["max_kimg"]
    for key, value in (("batch", 16), ("world_size", 4), ("preset", "demo")):
        with pytest.raises(ConfigError, match=f"{key}: checkpoint"):
            check_resume_config(saved, {**current, key: value})
