"""One job per output folder: an exclusive lock on `<folder>/.lock` while the job writes there.

    lock_directory(run_dir, "training run")     # DirectoryInUseError if another live process holds it
    ...
    unlock_directory(run_dir)                   # at the job's end: releases it, removes the file

A training run directory and an encoding destination each belong to one job: a second command started on
the same folder (typed twice, or rerun while workers of a killed launcher still run) would delete the
first one's partial files and interleave checkpoints or shards. The lock is an flock, so the kernel drops
it when its process dies, even by SIGKILL: a lock file left by a killed job locks nothing. One process per job
takes it (rank 0); on file systems without flock support (some network mounts) it is skipped.
"""

import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import IO

LOCK_NAME = ".lock"
_held: dict[Path, IO] = {}  # lock file -> its open handle (closing the handle releases the lock)


class DirectoryInUseError(RuntimeError):
    """Another live process holds the folder's lock."""


def _lock_path(directory: str | os.PathLike) -> Path:
    return Path(directory).resolve() / LOCK_NAME


def lock_directory(directory: str | os.PathLike, job: str) -> None:
    """Take the folder's lock (a no-op if this process holds it already). `job` names what uses the
    folder, for the error message."""
    path = _lock_path(directory)
    if path in _held:
        return
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):  # ENOLCK, EOPNOTSUPP: no flock here
                handle.close()
                return
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            message = f"{directory} is in use by another {job} ({holder})"
            raise DirectoryInUseError(f"{message}: wait for it to end or stop it, then rerun") from None
        if _same_file(handle, path):
            break
        handle.close()  # locked a file its holder removed on release: lock the one at the path now
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _held[path] = handle


def _same_file(handle: IO, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def unlock_directory(directory: str | os.PathLike) -> None:
    """Release the folder's lock if this process holds it, and remove the lock file (a killed holder
    leaves it behind, unlocked: harmless)."""
    path = _lock_path(directory)
    handle = _held.pop(path, None)
    if handle is not None:
        path.unlink(missing_ok=True)  # while still locked, so nobody locks the removed file unnoticed
        handle.close()
