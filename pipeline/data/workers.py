"""How DataLoader workers live and die with their rank.

SLURM sends SIGTERM to every process of a job before a preemption. The rank checkpoints after its current
step, which needs its data workers until then: a worker that died of that SIGTERM would fail the rank's
next batch. But every ending of a worker also goes through SIGTERM from its own rank: the DataLoader's
shutdown and multiprocessing's exit hook both `terminate()` workers and then wait for them. A worker that
ignored SIGTERM outright made those waits hang for ever (at interpreter exit, whatever exit hook ran first).

So a worker tells the senders apart: SIGTERM from its rank (its parent) ends it at once; from anyone else
it is left to the rank. It reads the sender from the signal's siginfo, which a Python handler cannot see,
hence SIGTERM is blocked and a thread waits for it with sigwaitinfo. And a worker whose rank is gone
(SIGKILL, a crash, `os._exit`) dies with it: Linux's parent-death signal, no polling.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def guard_worker(worker_id: int) -> None:
    """The DataLoader's worker_init_fn: runs in each worker before it reads anything."""
    rank = os.getppid()
    die_with_parent()
    if os.getppid() != rank:  # the rank died before the parent-death signal was armed
        os._exit(0)
    # blocked before the thread starts, so every thread of the worker inherits the block and the
    # signal waits, pending, for sigwaitinfo instead of killing the process
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=end_on_sigterm_from, args=(rank,), name="sigterm-from-rank", daemon=True).start()


def die_with_parent() -> None:
    """SIGKILL this process when the thread that started it ends (for DataLoader workers: the rank's
    loop, in its main thread). Linux only; elsewhere the DataLoader's own watchdog notices a dead parent
    within seconds."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def end_on_sigterm_from(rank: int) -> None:
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == rank:
            # exit status 0: the rank's DataLoader reports a worker killed by a signal as a failure
            os._exit(0)
