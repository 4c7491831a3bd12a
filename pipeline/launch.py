"""`accelerate launch`, except that SIGTERM is passed on to the ranks instead of ending the launcher, and
that a user error is one line.

    python -m pipeline.launch [accelerate launch options] -m pipeline.train --config FILE [key=value ...]

SLURM sends SIGTERM before a preemption or the time limit. Under plain `accelerate launch`, torch's
elastic agent turns it into an exception: it forwards SIGTERM to the ranks, gives them
30 seconds (its fixed shutdown timeout) before SIGKILL, and exits 1 with a traceback even
when every rank has checkpointed and exited 0. Here the agent leaves SIGTERM alone; this launcher hands
it to the ranks (pipeline.train checkpoints after the current step and exits 0) and goes on watching
them as usual, so the launch exits 0 without any deadline of its own (SLURM's KillWait still applies).

A user error (a bad config, a run folder held by another run): the ranks that find it say it in one
line (once per machine, pipeline.train) and exit 2. Plain `accelerate launch` then raises torch's
ChildFailedError, about 40 lines: its own traceback and a table of the ranks' exit codes. Here a launch
whose failed ranks all exited 2, but for those the agent stopped after (killed by its signal), exits 2
and adds nothing; torch's log lines about the failed ranks are held back until the launch's outcome is
known, and dropped for a user error. Any other failure is reported as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys

import psutil  # accelerate's own dependency

USER_ERROR = 2  # pipeline.train's (and argparse's) exit status for an error it has said in one line
LAUNCHER_PID = "PIPELINE_LAUNCHER_PID"  # read by pipeline.train (die_with_launcher)
# where torch's agent reports a failed rank and stops the others (its _poll and _close)
FAILURE_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def forward_to_ranks(signum: int, frame) -> None:
    for child in psutil.Process().children():  # the ranks (the agent starts them directly)
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signum)


class HeldBack(logging.Filter):
    """Holds the agent's lines about failed and stopped ranks until the launch's outcome is known."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] | None = []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.records is None or record.funcName not in ("_poll", "_close"):
            return True
        self.records.append(record)
        return False

    def release(self, logger: logging.Logger, show: bool = True) -> None:
        """From now on let every line through; show the held ones, or drop them (a user error)."""
        records, self.records = self.records or [], None
        for record in records if show else ():
            logger.handle(record)


def only_user_errors(exit_codes: list[int]) -> bool:
    """Some rank said a user error; every other failed rank either did too, or was killed by a signal:
    the agent's, which stops every rank still running once one has failed."""
    return USER_ERROR in exit_codes and all(code == USER_ERROR or code < 0 for code in exit_codes)


def main() -> None:
    # torchrun's --signals_to_handle (read from PET_SIGNALS_TO_HANDLE, since accelerate builds torchrun's
    # arguments from its defaults): the signals the agent turns into a shutdown; SIGTERM is not one of them
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the ranks' parent: the agent runs in this process
    signal.signal(signal.SIGTERM, forward_to_ranks)
    from accelerate.commands.launch import main as accelerate_launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    failure_log = logging.getLogger(FAILURE_LOGGER)
    held = HeldBack()
    failure_log.addFilter(held)
    sys.argv[0] = "python -m pipeline.launch"
    try:
        accelerate_launch()
    except ChildFailedError as error:  # several ranks (torch's agent)
        if only_user_errors([failure.exitcode for failure in error.failures.values()]):
            held.release(failure_log, show=False)
            sys.exit(USER_ERROR)
        raise
    except subprocess.CalledProcessError as error:  # one process (accelerate runs it directly)
        if error.returncode == USER_ERROR:
            sys.exit(USER_ERROR)
        raise
    finally:
        held.release(failure_log)


if __name__ == "__main__":
    main()
