"""`accelerate launch`, except that SIGTERM is passed on to the ranks instead of ending the launcher.

    python -m pipeline.launch [accelerate launch options] -m pipeline.train --config FILE [key=value ...]

SLURM sends SIGTERM before a preemption or the time limit. Under plain `accelerate launch`, torch's
elastic agent turns it into an exception: it forwards SIGTERM to the ranks, gives them
30 seconds (its fixed shutdown timeout) before SIGKILL, and exits 1 with a traceback even
when every rank has checkpointed and exited 0. Here the agent leaves SIGTERM alone; this launcher hands
it to the ranks (pipeline.train checkpoints after the current step and exits 0) and goes on watching
them as usual, so the launch exits 0 without any deadline of its own (SLURM's KillWait still applies).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import psutil  # accelerate's own dependency


def forward_to_ranks(signum: int, frame) -> None:
    for child in psutil.Process().children():  # the ranks (the agent starts them directly)
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signum)


def main() -> None:
    # torchrun's --signals_to_handle (read from PET_SIGNALS_TO_HANDLE, since accelerate builds torchrun's
    # arguments from its defaults): the signals the agent turns into a shutdown; SIGTERM is not one of them
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    signal.signal(signal.SIGTERM, forward_to_ranks)
    from accelerate.commands.launch import main as accelerate_launch

    sys.argv[0] = "python -m pipeline.launch"
    accelerate_launch()


if __name__ == "__main__":
    main()
