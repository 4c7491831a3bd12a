"""Divergence: roll back and skip, since an exact resume would replay it (faults.on_diverge: rollback).

A run here resumes exactly: the same data and the same noise after a checkpoint, so resuming a run that
diverged diverges again at the same step. PaLM's recipe (Chowdhery et al. 2022, section 5.1) is to restart
from a checkpoint before the spike and skip the data batches around it. When the run would stop for
non-finite updates (faults.max_skipped_steps_in_a_row in a row), or a step's loss passes
faults.spike_factor x the median of the last SPIKE_WINDOW steps', every rank reloads the last checkpoint
of the run's own timeline (the one it resumed from or last wrote) and the data goes on from the divergence
plus faults.rollback_skip_steps: the global micro-steps from the checkpoint's position to there are never
read. At most faults.max_rollbacks times.

Each rollback is recorded before the run goes on: a line of OUTPUT/rollbacks.jsonl (written whole and
fsynced), an event in metrics.jsonl, and the list in every later checkpoint's trainer_state.json. The
record is a skip, [FROM, TO) in global micro-steps, the form of faults.skip_micro_steps: a run resumed
from that checkpoint (after a SIGKILL right after the rollback, say) jumps over the same data at once,
and a run given the same skips in its config from the start trains the same weights bit for bit. The run
stays a pure function of its config and its record.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from pipeline.checkpoints import checkpoint
from pipeline.checkpoints.trainer_state import SPIKE_WINDOW
from pipeline.config.sections import FaultsConfig
from pipeline.errors import RecordError, TrainingStopped
from shards.format.shard_writer import sync_folder
from shards.regular_files import open_regular

RECORD = "rollbacks.jsonl"
FIELDS = ("diverged_at_step", "to_step", "from_micro_step", "to_micro_step")
MAX_RECORD_BYTES = 2**20


def read_records(output_dir: Path) -> list[dict[str, int]]:
    """The run's rollbacks so far ([] when none): each a dict of FIELDS, checked."""
    path = output_dir / RECORD
    if not path.exists():
        return []
    try:
        with open_regular(path) as file:
            text = file.read(MAX_RECORD_BYTES + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecordError(f"{path}: cannot read the run's rollbacks ({error})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        valid = isinstance(record, dict) and sorted(record) == sorted(FIELDS)
        if not valid or not all(type(record[name]) is int and record[name] >= 0 for name in FIELDS):
            raise RecordError(f"{path}: line {number} is not a rollback record ({', '.join(FIELDS)}: whole numbers)")
        if record["from_micro_step"] >= record["to_micro_step"]:
            raise RecordError(f"{path}: line {number} skips nothing (from_micro_step >= to_micro_step)")
        records.append(record)
    return records


def append_record(output_dir: Path, records: list[dict[str, int]]) -> None:
    """The whole record, rewritten in one rename after an fsync: a crash leaves the old one or the new."""
    path = output_dir / RECORD
    temporary = path.with_name(f".{RECORD}.tmp")
    with open(temporary, "w") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    sync_folder(output_dir)


def skip_table(configured: Iterable[tuple[int, int]], records: Iterable[dict[str, int]]) -> dict[int, int]:
    """FROM -> TO of every skip: the config's, then the record's (a later rollback to the same checkpoint
    skips further)."""
    table = dict(configured)
    for record in records:
        table[record["from_micro_step"]] = record["to_micro_step"]
    return table


def jump(micro_step: int, skips: dict[int, int]) -> int:
    """Where the data goes on from `micro_step`: over every skip that starts there (TO > FROM: ends)."""
    while micro_step in skips:
        micro_step = skips[micro_step]
    return micro_step


class SpikeWatch:
    """The last SPIKE_WINDOW steps' losses (the same on every rank: each is an all-reduced mean), in the
    checkpoint, so that a resumed run decides as the first did."""

    def __init__(self, factor: float | None, losses: Iterable[float] = ()) -> None:
        self.factor = factor
        self.losses: deque[float] = deque(losses, maxlen=SPIKE_WINDOW)

    def spiked(self, loss: float) -> bool:
        """Whether `loss` is a spike; a step that is not one joins the window."""
        if self.factor is None or not math.isfinite(loss):  # a non-finite step is the other watch's
            return False
        median = statistics.median(self.losses) if len(self.losses) == SPIKE_WINDOW else 0.0
        if median > 0 and loss > self.factor * median:  # a loss that can be zero or negative has no spikes
            return True
        self.losses.append(loss)
        return False


def diverged(
    step: int, spike_loss: float | None, skipped_in_a_row: int, faults: FaultsConfig, rollbacks: int, output_dir: Path
) -> TrainingStopped:
    """The one line a run that diverged and cannot roll back stops on (spike_loss: the step's loss when it
    spiked, None when the updates were non-finite). No checkpoint of this state is written: the last one
    stays the newest."""
    latest = checkpoint.checkpoints_root(output_dir) / checkpoint.LATEST
    last_good = latest.resolve().name if latest.exists() else "none yet"
    if spike_loss is not None:
        what = f"loss {spike_loss:.4g}, above faults.spike_factor x the median of the last {SPIKE_WINDOW} steps"
    else:
        what = (
            f"non-finite loss or gradients for {skipped_in_a_row} steps in a row (their updates were "
            "skipped; faults.max_skipped_steps_in_a_row)"
        )
    if faults.on_diverge == "rollback":
        why = (
            "faults.max_rollbacks reached"
            if rollbacks >= faults.max_rollbacks
            else "no checkpoint of this run before the divergence"
        )
        advice = f"rolling back is not possible ({why})"
    else:
        advice = "faults.on_diverge: rollback would go back to it and skip the data that led here"
    return TrainingStopped(
        f"step {step}: {what}; the last good checkpoint is {last_good}: lower the learning rate and resume "
        f"from it ({advice})"
    )


def possible(faults: FaultsConfig, rollbacks: int, good_checkpoint: int | None, step: int, output_dir: Path) -> bool:
    """Whether a run that diverged at `step` may roll back: faults.on_diverge is rollback, fewer than
    faults.max_rollbacks so far, and only to a checkpoint of this run's own timeline (good_checkpoint: the
    one it resumed from or last wrote, never a later step an abandoned timeline left, which `latest` may
    still name), before the divergence."""
    if faults.on_diverge != "rollback" or rollbacks >= faults.max_rollbacks:
        return False
    root = checkpoint.checkpoints_root(output_dir)
    return (
        good_checkpoint is not None
        and good_checkpoint < step
        and (root / checkpoint.folder_name(good_checkpoint)).is_dir()
    )
