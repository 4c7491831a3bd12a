"""Fetching remote shards ahead of training, so that at steady state no worker waits on the network.

The epoch's shard order is a pure function of (seed, epoch) (data.epoch_groups), so which shards the
run reads next is known in advance. A thread of each rank walks that plan from the run's position and
fetches into the node-local cache (shards.read.shard_cache: once per node, whoever asks first) every shard
of the groups being read, and more ahead while fewer than `depth` fetched shards are not yet read through
and they fit in the cache's limit. The sampler
tells it the micro-step being handed out; it never reads a sample. When it fails, the workers fetch
what they need themselves and meet the same error: the prefetcher only saves time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.config.sections import DataConfig
from pipeline.data.stream import StreamLayout, epoch_groups
from shards.read.reader import ShardSplit
from shards.read.shard_cache import CacheFull, DamagedShard
from shards.store.failures import StoreError, StoreUnavailable


@dataclass(frozen=True)
class PlannedGroup:
    first_step: int  # the global micro-steps that read the group's samples, first and last
    last_step: int
    shards: np.ndarray


def planned_groups(layout: StreamLayout, start: int) -> Iterator[PlannedGroup]:
    """The shard groups in reading order from global micro-step `start` on, for ever."""
    per_epoch = layout.steps_per_epoch
    epoch = start // per_epoch
    while True:
        first_sample = 0
        for group in epoch_groups(layout, epoch):
            size = sum(layout.counts[shard] for shard in group)
            first = epoch * per_epoch + first_sample // layout.global_batch
            last = epoch * per_epoch + min((first_sample + size - 1) // layout.global_batch, per_epoch - 1)
            first_sample += size
            if last >= start and first < (epoch + 1) * per_epoch:  # not before the start, not the dropped tail
                yield PlannedGroup(first, last, group)
        epoch += 1


class ShardPrefetcher:
    @classmethod
    def for_run(cls, split: ShardSplit, layout: StreamLayout, start: int, data: DataConfig) -> ShardPrefetcher | None:
        """The run's prefetcher from micro-batch `start` on: data.prefetch_shards deep (default twice
        data.shuffle_shards), None for a local split or a depth of 0."""
        depth = 2 * data.shuffle_shards if data.prefetch_shards is None else data.prefetch_shards
        if split.remote is None or depth == 0:
            return None
        return cls(split, layout, start, depth)

    def __init__(self, split: ShardSplit, layout: StreamLayout, start: int, depth: int) -> None:
        self.split, self.layout, self.depth = split, layout, depth
        self.micro_step = start
        self.stopping = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(start,), name="shard-prefetch", daemon=True)
        self.thread.start()

    def advance(self, micro_step: int) -> None:
        """The trainer has consumed `micro_step` micro-batches."""
        with self.changed:
            self.micro_step = micro_step
            self.changed.notify()

    def stop(self) -> None:
        with self.changed:
            self.stopping = True
            self.changed.notify()
        self.thread.join(timeout=5)  # a fetch in flight is not waited for: the thread is a daemon

    def _run(self, start: int) -> None:
        window: list[tuple[int, int]] = []  # (last micro-step that reads it, bytes) of each shard fetched
        try:
            for group in planned_groups(self.layout, start):
                for shard in group.shards:
                    record = self.split.shards[shard]
                    if not self._wait_for_room(window, group, record["bytes"]):
                        return
                    self.split.cache.fetch(self.split.remote, record)
                    window.append((group.last_step, record["bytes"]))
        except (StoreError, StoreUnavailable, CacheFull, DamagedShard):
            return  # the workers meet the same error and the rank reports it

    def _wait_for_room(self, window: list[tuple[int, int]], group: PlannedGroup, size: int) -> bool:
        """Wait until the shard may be fetched: its group is being read, or fewer than `depth` fetched
        shards are not yet read through and it fits in the cache's limit beside them. False once stopping."""
        limit = self.split.cache.limit
        with self.changed:
            while not self.stopping:
                window[:] = [(last, bytes_) for last, bytes_ in window if last >= self.micro_step]
                if group.first_step <= self.micro_step:
                    return True
                held = sum(bytes_ for _, bytes_ in window)
                if len(window) < self.depth and (limit is None or held + size <= limit):
                    return True
                self.changed.wait()
            return False
