"""`make demo` in shortened form: demo.py --quick runs every stage's real command line (toy images, tiny
VAE, encode_dataset.py, train_edm2.py --method edm2, torchrun train_edm2.py --method sida,
decode_samples.py) and writes its summary. Nothing is mocked; the stages are subprocesses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "demo.py", "--out", str(out), "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = (
        "preprocess.toy_images",
        "latent.tiny_vae",
        "encode_dataset.py",
        "--method edm2",
        "--method sida",
    )
    for command in (*stages, "decode_samples.py"):
        assert command in result.stdout  # every stage's command is printed before it runs

    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 60 and summary["classes"] == 10
    assert summary["teacher_kimg"] >= 0.128 and summary["student_kimg"] >= 0.096
    losses = {**summary["teacher_losses"], **summary["student_losses"]}
    assert losses and all(abs(v) < 1e6 for v in losses.values())
    fd = summary["latent_fd"]
    assert all(v >= 0 and v < 1e3 for v in fd.values())
    for name in ("student", "teacher"):
        grid = Image.open(summary["grids"][name])
        assert grid.size == (5 * 128, 4 * 128)  # 20 seeds -> ceil(sqrt(20)) = 5 columns, 4 rows
    assert len(list((out / "samples").rglob("*.png"))) == 20 + 1  # the seeds' PNGs and the grid
    assert (out / "sida" / "export-latest.safetensors").is_file()
