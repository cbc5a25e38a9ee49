"""Method "edm2": train_edm2.py trains a small EDM2 teacher from scratch with EDM2's loss (for the demo
and the toy reproduction), and its export serves as the teacher of a SiDA run.

    python -m pytest tests/test_train_edm2.py
"""

import json

import pytest
from helpers_train import cli_args, make_dataset, run_distributed

from sida_edm2.io.network_files import load_network
from sida_edm2.model.presets import get_preset


@pytest.mark.slow
def test_edm2_teacher_then_sida_from_its_export(tmp_path):
    data = make_dataset(tmp_path / "data", num_samples=32)
    teacher_run = tmp_path / "teacher"
    args = cli_args(None, teacher_run, data, method="edm2", batch=8, batch_gpu=4, max_kimg=0.016,
                    checkpoint_kimg=0.016, tick_kimg=0.008, lr=0.01)  # fmt: skip
    run_distributed("train_edm2.py", args, nproc=1)
    ticks = [json.loads(line) for line in (teacher_run / "stats.jsonl").read_text().splitlines()]
    assert [t["phase"] for t in ticks] == ["edm2", "edm2"]
    assert all(0 < t["loss/denoiser"] < 1e6 for t in ticks) and ticks[-1]["skipped/steps/count"] == 0
    assert list((teacher_run / "grids").glob("grid-*.png"))  # Heun samples of the EMA network
    teacher = load_network(teacher_run / "export-latest.safetensors")
    assert teacher.logvar_linear is not None
    assert teacher.init_kwargs["model_channels"] == get_preset("tiny")["network"]["model_channels"]

    student_run = tmp_path / "student"
    args = cli_args(teacher_run / "export-latest.safetensors", student_run, data, method="sida", batch=8,
                    batch_gpu=4, max_kimg=0.008, checkpoint_kimg=0.008, tick_kimg=0.008)  # fmt: skip
    run_distributed("train_edm2.py", args, nproc=1)
    assert (student_run / "export-latest.safetensors").is_file()
