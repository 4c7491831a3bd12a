"""Writing a taken save (pipeline/checkpoints/checkpointer.py takes it): rank 0 makes the staging folder;
every rank writes its files (fsynced, hashed); rank 0 writes config.json and commits
(pipeline/checkpoints/checkpoint.py: trainer_state.json with every file's hash, the atomic rename,
`latest`) and prunes. After each phase the ranks learn whether any of them failed (`agree`), so that no
rank is left waiting in a collective, and all stop with the first failure's line.

With checkpoint.async the writing runs in a background thread of each rank (torchtitan's async
checkpointing), on host copies of everything it writes, its collectives on a gloo process group of its
own: training stops only to take the save. The next save, a rollback and the end of the run (SIGTERM
included) first `wait` for the write in flight and raise its failure there, where every rank waits alike.
The files, their bytes and the commit are a synchronous save's: a kill during a background write leaves
`latest` on the previous complete checkpoint, as one during a synchronous write does.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from pipeline.checkpoints import checkpoint
from pipeline.errors import CheckpointError
from shards.errors import UserError

WRITE_TIMEOUT = timedelta(minutes=30)  # a background write's collectives: a peer silent this long fails it


@dataclass
class TakenSave:
    """A save taken, not yet written: everything it writes, on the host."""

    step: int
    staging: Path
    files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]  # this rank's, by name in the folder
    description: str | None  # config.json (rank 0)
    state: dict[str, Any] | None  # trainer_state.json but its list of files (rank 0)


def agree(failure: str | None, world_size: int, payload: Any = None, group=None) -> list[Any]:
    """A barrier that also tells every rank whether any rank failed (a rank failing alone would leave the
    others waiting in their next collective): then all raise the first failure's line. Returns every
    rank's payload. group: the process group (None: the default one)."""
    if world_size == 1:
        results = [(failure, payload)]
    else:
        results = [None] * world_size
        dist.all_gather_object(results, (failure, payload), group=group)
    failures = [message for message, _ in results if message]
    if failures:
        raise CheckpointError(failures[0])
    return [payload for _, payload in results]


class CheckpointWriter:
    def __init__(
        self, root: Path, keep_last: int, resumed_from: Path | None, rank: int, world_size: int, background: bool
    ) -> None:
        """Every rank, in the same order (a background writer makes a process group). resumed_from: the
        checkpoint the run continued from, never pruned by it."""
        self.root, self.keep_last, self.resumed_from = root, keep_last, resumed_from
        self.rank, self.world_size, self.background = rank, world_size, background
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-write") if background else None
        # the training thread's collectives and the writer's must not interleave on one group
        self.group = dist.new_group(backend="gloo", timeout=WRITE_TIMEOUT) if background and world_size > 1 else None
        self.in_flight: Future | None = None

    def write(self, taken: TakenSave) -> Path | None:
        """The checkpoint written and committed: its folder on rank 0, None elsewhere; in the background,
        None at once, the write in flight."""
        if self.pool is None:
            return self._write(taken)
        self.wait()
        self.in_flight = self.pool.submit(self._write, taken)
        return None

    def wait(self) -> Path | None:
        """The write in flight finished: its folder on rank 0 (None elsewhere, or with none in flight); its
        failure raised, on every rank."""
        if self.in_flight is None:
            return None
        in_flight, self.in_flight = self.in_flight, None
        return in_flight.result()

    def close(self, report: bool = True) -> None:
        """At the run's end: the write in flight finished, its failure raised (`report`: not when the run
        already fails with another), the thread let go."""
        try:
            self.wait()
        except CheckpointError:
            if report:
                raise
        finally:
            if self.pool is not None:
                self.pool.shutdown()

    def _write(self, taken: TakenSave) -> Path | None:
        try:
            return self._write_and_commit(taken)
        except CheckpointError as error:
            if self.rank == 0:  # a full disk: give back what the failed save took
                shutil.rmtree(taken.staging, ignore_errors=True)
            previous = self.root / checkpoint.LATEST
            kept = f"; {previous.resolve().name} is intact" if previous.exists() else ""
            raise CheckpointError(f"{error}{kept}") from None

    def _write_and_commit(self, taken: TakenSave) -> Path | None:
        step, staging = taken.step, taken.staging
        failure = None
        if self.rank == 0:
            try:
                shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
                (staging / checkpoint.OPTIMIZER_FOLDER).mkdir(parents=True)
            except OSError as error:
                failure = f"cannot write the checkpoint of step {step}: {error}"
        agree(failure, self.world_size, group=self.group)
        hashed, failure = {}, None
        try:
            hashed = checkpoint.write_tensor_files(staging, taken.files)
        except (OSError, SafetensorError) as error:  # a full disk, say: every rank must hear of it
            failure = f"rank {self.rank} cannot write its part of the checkpoint of step {step}: {error}"
        every_rank_hashed = agree(failure, self.world_size, hashed, self.group)
        final, failure = None, None
        if self.rank == 0:
            try:
                checkpoint.write_durably(staging / checkpoint.CONFIG_FILE, taken.description)
                hashed = {name: digest for record in every_rank_hashed for name, digest in record.items()}
                final = checkpoint.commit(staging, taken.state, hashed, self.resumed_from)
                checkpoint.prune(self.root, self.keep_last, final, self.resumed_from)
            except (OSError, UserError) as error:
                failure = f"cannot complete the checkpoint of step {step}: {error}"
        agree(failure, self.world_size, group=self.group)  # nobody runs ahead (or exits) before it exists
        return final
