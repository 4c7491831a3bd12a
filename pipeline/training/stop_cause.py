"""The line that says why a run stopped, where every rank finds it.

A rank that stops on a user's error mid-run (a store gone past its retry budget, a full disk) says its
line and exits; the other ranks then meet the closed connection in their next collective and used to
stop with "Connection closed by peer", so that the first line of their logs named the consequence. The
stopping rank leaves its line in the run folder (shared by every rank: checkpoints are written there),
and a rank stopped by a lost peer looks for it first and says it as its own first line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

FOLDER = ".stop-causes"
# the stopping rank writes its line before it exits, so before its peers see it gone; on a shared file system
# a new file may take a few seconds to show on other nodes
LOOK_SECONDS = 10.0


def clear(output_dir: Path) -> None:
    """At the start of an attempt (the first rank, before the others start): causes of an earlier one go."""
    shutil.rmtree(output_dir / FOLDER, ignore_errors=True)


def leave(output_dir: Path, rank: int, line: str) -> None:
    folder = output_dir / FOLDER
    with contextlib.suppress(OSError):  # the cause is said on this rank anyway
        folder.mkdir(exist_ok=True)
        temp = folder / f".rank-{rank}.{os.getpid()}"
        temp.write_text(line + "\n")
        os.replace(temp, folder / f"rank-{rank}.txt")


def find(output_dir: Path, wait_seconds: float = LOOK_SECONDS) -> tuple[int, str] | None:
    """(rank, line) of the first rank that left a cause, waiting up to `wait_seconds` for one."""
    deadline = time.monotonic() + wait_seconds
    while True:
        found = []
        for path in (output_dir / FOLDER).glob("rank-*.txt"):
            with contextlib.suppress(OSError, ValueError):
                found.append((path.stat().st_mtime_ns, int(path.stem.removeprefix("rank-")), path.read_text()))
        if found:
            _, rank, line = min(found)
            return rank, line.strip()
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)
