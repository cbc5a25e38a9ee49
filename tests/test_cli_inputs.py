"""Hostile inputs to the command lines: every one ends in one line that names the option or file, a
non-zero exit and no traceback (real files on disk, real CLIs through click's CliRunner).

    python -m pytest tests/test_cli_inputs.py
"""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers_sampling import tiny_net, tiny_vae
from helpers_train import cli_args, make_dataset, make_teacher

import decode_samples
import train_edm2
from sida_edm2.io.network_files import ACCEPTED_FORMATS, save_export
from sida_edm2.model.presets import PRESETS
from sida_edm2.sample.metrics import main as metrics_main

# name -> how to make it from a good export (weights bytes, config text) in a folder.
BAD_NETWORKS = ("missing.pkl", "random.pkl", "truncated.pkl", "list.pkl", "state.pt", "random.safetensors")
BAD_NETWORKS += ("truncated.safetensors", "mismatch.safetensors")


def _write_bad_network(root, name, good):
    path = root / name
    random_bytes = np.random.default_rng(0).bytes(4096)
    weights, config = good.read_bytes(), good.with_suffix(".json").read_text()
    if name == "random.pkl":
        path.write_bytes(random_bytes)
    elif name == "truncated.pkl":
        path.write_bytes(pickle.dumps({"ema": list(range(1000))})[:100])
    elif name == "list.pkl":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    elif name == "state.pt":
        torch.save({"w": torch.zeros(3)}, path)
    elif name.endswith(".safetensors") and name != "mismatch.safetensors":
        path.write_bytes(random_bytes if name.startswith("random") else weights[: len(weights) // 2])
        path.with_suffix(".json").write_text(config)
    elif name == "mismatch.safetensors":  # a config that does not describe the weights beside it
        shutil.copy(good, path)
        edited = json.loads(config)
        edited["init_kwargs"]["model_channels"] *= 2
        path.with_suffix(".json").write_text(json.dumps(edited))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    good, _ = save_export(tiny_net(seed=0), root / "good.safetensors")
    tiny_vae().save_pretrained(root / "vae")
    bad = {name: _write_bad_network(root, name, good) for name in BAD_NETWORKS}
    teacher = make_teacher(root / "teacher.safetensors")
    return {
        "root": root,
        "good": good,
        "bad": bad,
        "teacher": teacher,
        "data": make_dataset(root / "data", 8),
    }


def _assert_one_line_error(result, *fragments, code=None):
    """The last line is click's error line holding every fragment; no traceback, a non-zero exit."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code if code else result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    error = last if last.startswith("Error:") else result.output.strip().split("Error:")[-1]
    for fragment in fragments:
        assert fragment in error, result.output


def _decode(assets, tmp_path, *args):
    base = ["--vae", str(assets["root"] / "vae"), "--outdir", str(tmp_path / "out"), "--device", "cpu"]
    return CliRunner().invoke(decode_samples.main, [*base, *map(str, args)])


@pytest.mark.parametrize("name", BAD_NETWORKS)
def test_decode_generator_that_cannot_be_used(assets, tmp_path, name):
    result = _decode(assets, tmp_path, "--generator", assets["bad"][name], "--seeds", "0")
    if name == "mismatch.safetensors":  # the file is read, but its weights do not fit its config
        _assert_one_line_error(result, f"{assets['bad'][name]}: its weights do not fit", "shape differences")
    else:
        _assert_one_line_error(result, str(assets["bad"][name]), ACCEPTED_FORMATS)
    assert not list((tmp_path / "out").rglob("*.png"))


@pytest.mark.parametrize("name", ["random.pkl", "truncated.safetensors", "state.pt", "mismatch.safetensors"])
def test_train_teacher_and_init_generator_that_cannot_be_used(assets, tmp_path, name):
    bad = assets["bad"][name]
    expected = "its weights do not fit" if name == "mismatch.safetensors" else ACCEPTED_FORMATS
    as_teacher = cli_args(bad, tmp_path / "run", assets["data"])
    result = CliRunner().invoke(train_edm2.main, as_teacher)
    _assert_one_line_error(result, f"--teacher: {bad}", expected, code=2)
    as_init = cli_args(
        assets["teacher"], tmp_path / "run", assets["data"], method="sid2a", init_generator=bad
    )
    result = CliRunner().invoke(train_edm2.main, as_init)
    _assert_one_line_error(result, f"--init-generator: {bad}", expected, code=2)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--seeds", "abc", "'abc' is not a non-negative integer or a range"),
        ("--seeds", "5-1", "range '5-1' runs backwards"),
        ("--seeds", ",", "no integers in ','"),
        ("--classes", "1,x", "'x' is not a non-negative integer"),
        ("--classes", "10", "has 10 classes: use classes 0-9"),
        ("--few-step-sigmas", "abc", "could not convert string to float"),
        ("--few-step-sigmas", "1.0,2.0", "few-step sigmas must decrease from 2.5 and stay > 0"),
        ("--few-step-sigmas", "nan", "few-step sigmas must decrease"),
        ("--format", "pngx", "unknown format(s) pngx; choose from png, npz, grid"),
        ("--format", ",", "no format given; choose from png, npz, grid"),
    ],
)
def test_decode_list_options_give_usage_errors(assets, tmp_path, option, value, message):
    result = _decode(assets, tmp_path, "--generator", assets["good"], "--seeds", "0-1", option, value)
    _assert_one_line_error(result, f"Invalid value for '{option}'", message, code=2)


def test_train_help_lists_the_presets(assets, tmp_path):
    help_text = CliRunner().invoke(train_edm2.main, ["--help"]).output
    preset_help = help_text.split("--preset", 1)[1].split("--method", 1)[0]
    assert all(name in preset_help for name in PRESETS), help_text
    result = CliRunner().invoke(train_edm2.main, cli_args(assets["teacher"], tmp_path / "run", preset="nope"))
    _assert_one_line_error(result, "Invalid value for '--preset': 'nope' is not one of", "'tiny'", code=2)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"num_workers": -1}, "--num-workers must be >= 0"),
        ({"sigma_init": 0}, "--sigma-init must be > 0"),
        ({"grid_kimg": 0}, "--grid-kimg must be > 0"),
        ({"lambda_sid": -1}, "--lambda-sid must be >= 0"),
        ({"fake_only_kimg": -1}, "--fake-only-kimg must be >= 0"),
        ({"lr": "nan"}, "--lr must be a finite number"),
        ({"max_kimg": "inf"}, "--max-kimg must be a finite number"),
        ({"vae": "nowhere/at/all"}, "--vae: the VAE nowhere/at/all is neither a local folder nor a"),
        ({"ds_config": "FILE"}, "cannot be read as JSON"),
    ],
)
def test_train_bad_values_are_usage_errors(assets, tmp_path, flags, message):
    not_json = tmp_path / "not.json"
    not_json.write_text("zero: 2\n")
    flags = {k: not_json if v == "FILE" else v for k, v in flags.items()}
    args = cli_args(assets["teacher"], tmp_path / "run", assets["data"], **flags)
    result = CliRunner().invoke(train_edm2.main, [*args, "--dry-run"])
    _assert_one_line_error(result, message, code=2)


def test_decode_bad_device_vae_ref_and_outdir(assets, tmp_path):
    not_a_file = tmp_path / "plain.txt"
    not_a_file.write_text("x")
    cases = [
        (["--device", "bogus"], "Invalid value for '--device': 'bogus' is not a device"),
        (["--device", "cuda:99"], "Invalid value for '--device': cuda:99: this machine has"),
        (
            ["--vae", tmp_path / "novae"],
            f"Invalid value for '--vae': the VAE {tmp_path / 'novae'} is neither",
        ),
        (["--vae", tmp_path], "is not a diffusers AutoencoderKL folder (no config.json)"),
        (["--metrics", "fid", "--ref", not_a_file], "Invalid value for '--ref': "),
        (
            ["--outdir", not_a_file / "out"],
            f"Invalid value for '--outdir': cannot create {not_a_file / 'out'}",
        ),
    ]
    for extra, message in cases:
        result = _decode(assets, tmp_path, "--generator", assets["good"], "--seeds", "0", *extra)
        _assert_one_line_error(result, message, code=2)
    assert not list(tmp_path.rglob("*.png"))


def test_metrics_cli_bad_device(tmp_path):
    result = CliRunner().invoke(
        metrics_main,
        ["ref", "--source", str(tmp_path), "--dest", str(tmp_path / "r.pkl"), "--device", "gpu0"],
    )
    _assert_one_line_error(result, "Invalid value for '--device': 'gpu0' is not a device", code=2)


def test_metrics_cli_bad_source_ref_dest_and_missing_weights(tmp_path):
    # Each is found before any image is read; none ends in a traceback or click's bare "Aborted!".
    images = tmp_path / "images"
    images.mkdir()
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    stats = tmp_path / "fid-only.pkl"
    stats.write_bytes(pickle.dumps({"fid": {"mu": np.zeros(2), "sigma": np.eye(2)}}))
    nowhere = tmp_path / "no-inception.pt"
    cases = [
        (["ref", "--source", tmp_path / "nope", "--dest", tmp_path / "r.pkl"], "'--source': ", 2),
        (["ref", "--source", images, "--dest", tmp_path / "no" / "r.pkl"], "'--dest': cannot write in", 2),
        (["calc", "--source", images, "--ref", empty], "not EDM2-style reference statistics", 2),
        (["calc", "--source", images, "--ref", stats, "--metrics", "fd_dinov2"], "has no statistics for", 2),
        (["calc", "--source", images, "--ref", stats, "--metrics", "fid", "--inception", nowhere], "FID", 1),
    ]
    for args, message, code in cases:
        result = CliRunner().invoke(metrics_main, [str(a) for a in args])
        _assert_one_line_error(result, message, code=code)
    assert not (tmp_path / "r.pkl").exists()


@pytest.mark.slow  # its own process: the error comes after the process group is made
def test_train_run_dir_that_cannot_be_created(assets):
    # Root passes every permission check: only the mkdir itself can tell (/proc takes no new folders).
    import subprocess
    import sys

    from helpers_train import REPO, subprocess_env

    flags = cli_args(assets["teacher"], "/proc/no-run-here", assets["data"])
    args = [sys.executable, "train_edm2.py", *flags]
    proc = subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Error: --run-dir /proc/no-run-here " in proc.stderr
