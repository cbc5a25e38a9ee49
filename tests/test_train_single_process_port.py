"""A single training process without a launcher must not depend on the fixed port 29500 being free
(the demo runs `python train_edm2.py` while other jobs may hold it)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, socket
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", 29500))
        blocker.listen()
    except OSError:
        pass  # already held by someone else: the point of the test either way
    from sida_edm2.train.engines import init_deepspeed_distributed
    env = init_deepspeed_distributed()
    import torch
    torch.distributed.barrier()
    print("ok", env.rank, env.world_size, os.environ["MASTER_PORT"])
    from sida_edm2.sample.torchrun_env import leave_process_group
    leave_process_group(failed=True)  # one process: destroyed even after an error
    assert not torch.distributed.is_initialized()
    """
)


def test_single_process_init_avoids_a_busy_default_port():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    word, rank, world, port = result.stdout.split()[-4:]
    assert (word, rank, world) == ("ok", "0", "1") and port != "29500"
