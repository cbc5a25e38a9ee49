"""One job per output folder (latent/dir_lock.py): a second training run or encoding job started on a folder
that a live process is using stops with one line naming the holder, and changes nothing there; a killed
holder leaves no stale lock."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latent.dir_lock import DirectoryInUseError, lock_directory, unlock_directory
from tests.helpers_train import cli_args, launch_command, make_dataset, make_teacher, subprocess_env

REPO = Path(__file__).resolve().parent.parent
HOLD = "import sys, time; from latent.dir_lock import lock_directory; lock_directory(sys.argv[1], 'test'); print('held', flush=True); time.sleep(600)"  # noqa: E501


def hold(directory: Path) -> subprocess.Popen:
    """Another process holding `directory`'s lock until killed."""
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", HOLD, str(directory)]
    proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_folder_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = hold(tmp_path)
    try:
        with pytest.raises(DirectoryInUseError, match=rf"in use by another job \(pid {holder.pid} on "):
            lock_directory(tmp_path, "job")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_directory(tmp_path, "job")  # the kernel dropped the dead holder's lock
    lock_directory(tmp_path, "job")  # this process holds it: a no-op
    unlock_directory(tmp_path)
    assert not (tmp_path / ".lock").exists()  # a finished job leaves nothing behind
    second = hold(tmp_path)  # released: another process can take it
    second.kill()
    second.wait()


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_second_training_run_on_a_busy_run_dir_stops_and_keeps_its_files(tmp_path, nproc):
    # Two processes: every rank stops with rank 0's error, none waits in a collective that rank 0 left.
    run_dir = tmp_path / "run"
    holder = hold(run_dir)
    partial = run_dir / ".export-latest.safetensors.tmp-123"  # what a rerun would remove if it went on
    partial.write_bytes(b"being written")
    teacher = make_teacher(tmp_path / "teacher.safetensors")
    data = make_dataset(tmp_path / "data")
    flags = cli_args(teacher, run_dir, data, method="sida", max_kimg=0.016)
    single = [sys.executable, "train_edm2.py", *flags]
    args = single if nproc == 1 else launch_command("train_edm2.py", flags, 2)
    try:
        start = time.monotonic()
        env = subprocess_env()
        proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    # The launcher reports a failed worker as 1, with its own ChildFailedError traceback (and may stop
    # the other rank by SIGTERM first); no worker prints a traceback: none is left in a collective.
    assert proc.returncode == (2 if nproc == 1 else 1), proc.stderr[-3000:]
    assert proc.stderr.count("Traceback") == (0 if nproc == 1 else 1), proc.stderr
    assert "[rank" not in proc.stderr, proc.stderr  # torchrun's prefix of a worker's traceback
    assert f"Error: {run_dir} is in use by another training run (pid {holder.pid} on " in proc.stderr
    assert partial.read_bytes() == b"being written" and not (run_dir / "log.txt").exists()
    assert time.monotonic() - start < 120


def test_second_encoding_job_on_a_busy_destination_is_refused(tmp_path):
    from click.testing import CliRunner

    from encode_dataset import main
    from latent.tiny_vae import create_tiny_vae
    from preprocess.toy_images import write_toy_dataset

    images = tmp_path / "images"
    write_toy_dataset(images, per_class=1, resolution=32)
    vae = tmp_path / "vae"
    create_tiny_vae(vae, resolution=32)
    dest = tmp_path / "latents"
    holder = hold(dest)
    try:
        args = ["--source", images, "--dest", dest, "--vae", vae, "--resolution", 32, "--no-progress"]
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{dest} is in use by another encoding job (pid {holder.pid} on " in result.output
    assert not (dest / "plan.json").exists() and not list(dest.glob("*.tar"))
    args = ["--source", images, "--dest", dest, "--vae", vae, "--resolution", 32, "--no-progress"]
    assert CliRunner().invoke(main, [str(a) for a in args]).exit_code == 0  # the holder is gone
