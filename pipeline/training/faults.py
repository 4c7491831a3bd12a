"""What the trainer does about faults it can survive: a non-finite update, and SIGTERM.

Non-finite loss or gradient: DeepSpeed's ZeRO optimizer already checks the reduced gradients for
inf/NaN, agrees on the answer across ranks (an all-reduce) and skips the update on every rank alike,
but only under fp16 and bf16. `skip_nonfinite_updates` turns that check on for fp32 too, and gives
ZeRO-0's plain torch optimizer the same behaviour (its gradients are already all-reduced, so every
rank sees the same inf/NaN). Either way the engine counts the skipped updates in `skipped_steps`.

SIGTERM (what SLURM sends before a preemption or at the time limit, and what the launcher forwards):
each rank that receives it raises a flag; at every step boundary the ranks take the maximum of their
flags, so that all of them stop after the same step, write a checkpoint, and exit 0. A rank that is
waiting for its next batch when SIGTERM comes (a stalled store) cannot reach that boundary: if it is
still waiting `faults.stop_grace_seconds` later, the wait is interrupted (SIGALRM, whose handler raises
in the main thread, where the DataLoader's or the fetch's wait can be interrupted) and the rank stops
with one line, its last checkpoint kept as it is: a scheduler's kill must not find it waiting.
"""

from __future__ import annotations

import contextlib
import datetime
import signal
import sys
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from accelerate import Accelerator

from pipeline.config.sections import FaultsConfig
from pipeline.engine import deepspeed_internals as internals
from shards.errors import UserStop


def skip_nonfinite_updates(engine) -> None:
    if internals.turn_on_zero_overflow_check(engine):  # ZeRO-1/2
        return
    plain = internals.plain_optimizer(engine)  # a plain torch optimizer under ZeRO-0 (fp32)
    if plain is not None:
        guard_plain_optimizer(plain)


def guard_plain_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Skip a step whose gradients are not finite, and tell the engine, which counts it as skipped."""
    step = optimizer.step

    def step_if_finite(*args, **kwargs):
        gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # One read of each gradient and one sync for all: a sum is non-finite when any element is (DeepSpeed's
        # fp16 overflow check does the same). DeepSpeed's has_inf_or_nan (a min and a max) reads each gradient
        # twice (profiled on the `vae` step: 0.99 s -> 0.45 s in 20 steps). A finite sum past 3e38 also counts:
        # gradients that large have diverged.
        overflow = bool(gradients) and not bool(torch.stack([g.sum() for g in gradients]).isfinite().all())
        internals.report_overflow(optimizer, overflow)
        if not overflow:
            return step(*args, **kwargs)
        return None

    internals.report_overflow(optimizer, False)
    optimizer.step = step_if_finite


class NonFiniteWatch:
    """Updates DeepSpeed skipped on every rank alike (a non-finite gradient): each warned of, and the run
    diverged once faults.max_skipped_steps_in_a_row have been skipped in a row."""

    def __init__(self, limit: int, accelerator) -> None:
        self.limit, self.accelerator = limit, accelerator
        self.in_a_row = 0  # up to the last step

    def count(self, step: int, skipped: bool) -> bool:
        """Whether the run has now diverged."""
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if skipped and self.in_a_row < self.limit and self.accelerator.is_main_process:
            print(
                f"pipeline train: warning: step {step}: non-finite loss or gradient, the update was skipped on "
                f"every rank ({self.in_a_row} in a row; the run stops at {self.limit})",
                file=sys.stderr,
            )
        return self.in_a_row >= self.limit


class StoppedWaitingForData(UserStop):
    """SIGTERM came while this rank waited for data, and the data did not come within the grace time."""


def host_group(accelerator: Accelerator, faults: FaultsConfig):
    """A gloo process group of every rank, for StopRequest.agreed's host numbers (None on one process).
    Every rank creates it, at the same point."""
    if accelerator.num_processes == 1:
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=faults.collective_timeout_minutes))


class StopRequest:
    """SIGTERM raises this rank's flag; `agreed` tells every rank whether any rank's flag is up, and
    whether any rank's clock says a checkpoint is due (`checkpoint.every_minutes`): the same one
    all-reduce a step, so that every rank takes part in the same checkpoints (a checkpoint is a
    collective) even though their clocks and signals differ."""

    def __init__(self, checkpoint_minutes: float | None = None, grace_seconds: float = 30) -> None:
        self.received = False
        self.waiting_for_data = False
        self.grace_seconds = grace_seconds
        self.previous = signal.signal(signal.SIGTERM, self._receive)
        self.previous_alarm = signal.signal(signal.SIGALRM, self._grace_over)
        self.checkpoint_seconds = None if checkpoint_minutes is None else checkpoint_minutes * 60
        self.clock_started()

    def _receive(self, signum: int, frame) -> None:
        if not self.received and self.waiting_for_data:
            signal.setitimer(signal.ITIMER_REAL, self.grace_seconds)
        self.received = True  # a second SIGTERM (the launcher forwarding it) changes nothing

    def _grace_over(self, signum: int, frame) -> None:
        if self.waiting_for_data:
            self.waiting_for_data = False
            raise StoppedWaitingForData(
                f"stopped by SIGTERM while waiting for data: none came within faults.stop_grace_seconds "
                f"({self.grace_seconds:g} s; a slow or stalled store: data.read_timeout and data.retry_seconds "
                "bound each fetch); no checkpoint written since the last one: run again to resume from it"
            )

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """The block waits for data: SIGTERM during it (or before it) gives it the grace time, no more."""
        self.waiting_for_data = True
        if self.received:
            signal.setitimer(signal.ITIMER_REAL, self.grace_seconds)
        try:
            yield
        finally:
            self.waiting_for_data = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def clock_started(self) -> None:
        """A checkpoint was written (or the run started): the clock of `checkpoint.every_minutes` starts again."""
        self.last_checkpoint = time.monotonic()

    def agreed(
        self, accelerator: Accelerator, share: torch.Tensor | float = 0.0, host_group=None
    ) -> tuple[bool, bool, float]:
        """(stop, checkpoint by the clock, the sum of every rank's `share`), the same on every rank: one
        all-reduce carries them all (the share: each rank's part of the step's mean loss). A collective:
        call on every rank at the same point. host_group: a gloo group of every rank, for an agreement of
        host numbers alone (a float share): then the all-reduce never waits for the device's queued work (on
        a GPU, a synchronisation every step); a share on the device goes through the device's group."""
        due = self.checkpoint_seconds is not None and time.monotonic() - self.last_checkpoint >= self.checkpoint_seconds
        on_host = host_group is not None and not isinstance(share, torch.Tensor)
        device = torch.device("cpu") if on_host else accelerator.device
        flags = torch.tensor([float(self.received), float(due)], dtype=torch.float64, device=device)
        summed = torch.cat([flags, torch.as_tensor(share, dtype=torch.float64, device=device).view(1)])
        if on_host:
            dist.all_reduce(summed, group=host_group)
        else:
            summed = accelerator.reduce(summed, reduction="sum")
        stop, clock, total = summed.tolist()
        return stop > 0, clock > 0, total

    def restore(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, self.previous)
        signal.signal(signal.SIGALRM, self.previous_alarm)
