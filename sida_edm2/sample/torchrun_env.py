"""Joining and leaving a torchrun launch (one GPU per process).

rank, world_size, device = join_torchrun()          # WORLD_SIZE > 1: nccl on GPUs, gloo on CPU
...
barrier()                                               # no-op in a single process
leave_process_group()                                   # every CLI's last step on success
"""

import datetime
import os

import torch
import torch.distributed as dist


def join_torchrun(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*), if any.
    Returns (rank, world_size, device): cuda:LOCAL_RANK when CUDA is there, else the CPU, unless
    `device` names one explicitly (single-process runs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None and world_size == 1:
        chosen = torch.device(device)
    elif torch.cuda.is_available():
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        # Generous: rank 0 may spend a long time alone (e.g. streaming 50k PNGs into an .npz).
        timeout = datetime.timedelta(hours=2)
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", timeout=timeout)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return rank, world_size, chosen


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def leave_process_group(failed: bool = False) -> None:
    """Destroy the process group (if any) at the end of a run; without it a gloo process can abort at
    interpreter exit (its worker threads outlive Python) and turn a finished run into a failed one.

    failed: the run stops on an error, perhaps on this rank alone. Then only a group whose destruction
    cannot wait on a peer is destroyed (one process, or gloo, whose collectives this code always
    completes before going on): with NCCL a destroy while a peer still waits in a collective hangs,
    and the launcher would never see the error."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if failed and dist.get_world_size() > 1 and dist.get_backend() != "gloo":
        return
    dist.destroy_process_group()
