"""A run folder is held by one run at a time.

Two runs writing one folder interleave their metrics.jsonl lines and replace each other's checkpoints.
The run's first process (global rank 0) holds a POSIX record lock (`fcntl.lockf`) on OUTPUT/run.lock for
the whole run. The kernel drops it when that process ends, however it ends (SIGKILL, a crash, the OOM
killer), so a dead run never leaves its folder locked and `resume: auto` just works; on NFS the lock
manager (NFSv4's own, lockd for NFSv3) makes the lock hold between nodes, and frees it once a dead
holder's lease runs out (90 s by default on NFSv4). The file says who holds it (pid, host, since when,
which launch), so that a refused run can name the holder.

The other ranks never take the lock: they wait until the file names their own launch, so that none of
them writes in the folder, or even starts up DeepSpeed, for a run that its first rank is refused (the
launcher then stops them).

A POSIX lock belongs to a process and is dropped when that process closes *any* descriptor of the file:
the holder opens the file once and never closes it (its forked children, DataLoader workers, hold no
locks of their own; closing their copies drops nothing).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from shards.errors import UserError

LOCK_FILE = "run.lock"
# the lock cannot be had at all: a file system without POSIX locks (some FUSE mounts, NFS without lockd)
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


def launch_name() -> str:
    """What every rank of one launch shares and no two live launches can: the rendezvous address and port
    (on loopback, every rank is on this machine: its name stands for the address)."""
    address = os.environ.get("MASTER_ADDR", "")
    if address in ("", "localhost", "127.0.0.1", "::1"):
        address = socket.gethostname()
    return f"{address}:{os.environ.get('MASTER_PORT', '')}"


class RunLock:
    """Taken by the run's first process only."""

    def __init__(self, output_dir: Path, warn: Callable[[str], None]) -> None:
        self.output_dir = output_dir
        self.path = output_dir / LOCK_FILE
        self.warn = warn
        self.fd: int | None = None

    def take_if_present(self) -> None:
        """Hold the folder now if a run ever held it, before this run reads anything in it, and without
        creating anything (a run refused later, for a bad config, must leave no trace)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        self._lock(fd)

    def take(self) -> None:
        """Hold the folder, creating it and its lock file as needed. Raises OSError when it cannot be written."""
        if self.fd is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._lock(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))

    def _lock(self, fd: int) -> None:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in NO_LOCKS:
                holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "it has not yet said which"
                os.close(fd)  # this process holds no lock on the file: closing drops nothing
                if error.errno in (errno.EACCES, errno.EAGAIN):
                    raise UserError(
                        f"output_dir: {self.output_dir} is in use by another run ({holder}); "
                        "wait for it to end or stop it, or choose another output_dir"
                    ) from None
                raise
            self.warn(f"cannot lock {self.path} ({error.strerror}): nothing stops a second run from using it too")
        self.fd = fd
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {started}, launch {launch_name()}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        os.fsync(fd)


def wait_for_first_rank(output_dir: Path, timeout_s: float) -> None:
    """On the other ranks: return once the lock file names this launch (the first rank holds the folder,
    or, a relaunch, held it last and is about to again). A first rank refused the folder makes the
    launcher stop this one meanwhile."""
    name, deadline = f", launch {launch_name()}\n", time.monotonic() + timeout_s
    while True:
        try:
            if (output_dir / LOCK_FILE).read_text().endswith(name):
                return
        except OSError:  # not there yet
            pass
        if time.monotonic() > deadline:
            raise UserError(f"output_dir: the first rank did not take {output_dir / LOCK_FILE} in {timeout_s:.0f} s")
        time.sleep(0.1)
