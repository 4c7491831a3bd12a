"""pipeline.train, really killed at a chosen point: rank 0 sends SIGKILL to every process of the run (the
launcher, every rank, every data worker) at once, as a node failure would.

KILL_AT=micro_step:N      once rank 0 has run N micro-batches (N not on an accumulation boundary: mid-step)
KILL_AT=state_write:N     halfway through writing the N-th checkpoint's trainer_state.json
KILL_AT=disk_full:R       no kill: rank R's disk is full when it writes its part of a checkpoint
KILL_AT=sigterm:N         rank 0 sends SIGTERM to every process of the run after N micro-batches, as SLURM
                          does before a preemption
KILL_AT=rank_1:N          only rank 1 dies (SIGKILL) after N micro-batches; it first writes the time to
                          the file $KILL_TIME_FILE
KILL_AT=freeze_1:N        only rank 1 freezes (SIGSTOP: alive, sockets open, silent) after N micro-batches
KILL_AT=rollback:N        right after the N-th rollback (faults.on_diverge: rollback) is recorded, before
                          any rank trains on
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline import train
from pipeline.checkpoints import checkpoint
from pipeline.training.trainer import Trainer


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue += children.get(pid, [])
    return found


def kill_the_run(sent: signal.Signals = signal.SIGKILL) -> None:
    """Sent by another process, /bin/kill, as by SLURM or a node failure: data workers end on a SIGTERM
    from their own rank (pipeline/data/workers.py), not on one from elsewhere."""
    # under accelerate launch the parent is the launcher; a lone `python killing_trainer.py` kills itself
    root = os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()
    pids = sorted(descendants(root), key=lambda pid: pid == os.getpid())  # this process last
    subprocess.run(["kill", f"-{sent.name.removeprefix('SIG')}", *map(str, pids)], stderr=subprocess.DEVNULL)


def after_micro_steps(count: int, action) -> None:
    original_step = Trainer.train_step

    def train_step(self, batch):
        metrics = original_step(self, batch)
        if self.micro_step == count:
            action()
        return metrics

    Trainer.train_step = train_step


def die_alone() -> None:
    Path(os.environ["KILL_TIME_FILE"]).write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    kind, count = os.environ["KILL_AT"].split(":")
    count = int(count)
    rank = int(os.environ.get("RANK", "0"))
    if kind == "disk_full" and rank == count:

        def write_tensor_files(folder, files):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))

        checkpoint.write_tensor_files = write_tensor_files
    if kind == "rank_1" and rank == 1:
        after_micro_steps(count, die_alone)
    if kind == "freeze_1" and rank == 1:
        after_micro_steps(count, lambda: os.kill(os.getpid(), signal.SIGSTOP))
    if rank != 0:
        return train.main()
    if kind == "micro_step":
        after_micro_steps(count, kill_the_run)
    elif kind == "rollback":
        original_roll_back = Trainer._roll_back

        def roll_back(self, log) -> None:
            original_roll_back(self, log)
            if len(self.rollbacks) == count:
                kill_the_run()

        Trainer._roll_back = roll_back
    elif kind == "sigterm":
        after_micro_steps(count, lambda: kill_the_run(signal.SIGTERM))
    elif kind == "state_write":
        original_write = checkpoint.write_durably
        writes = []

        def write_durably(path: Path, text: str) -> None:
            if path.name == checkpoint.STATE_FILE:
                writes.append(path)
                if len(writes) == count:
                    path.write_text(text[: len(text) // 2])
                    kill_the_run()
            original_write(path, text)

        checkpoint.write_durably = write_durably
    return train.main()


if __name__ == "__main__":
    sys.exit(main())
