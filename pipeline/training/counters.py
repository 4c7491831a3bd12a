"""The run's counters: what each rank met since the last count (unreadable samples, remote fetches, the
plugin's metrics and step totals), summed over ranks when the loop logs, checkpoints or decides which
networks sit out a step. Every method that sums over ranks is a collective: all ranks call it together."""

from __future__ import annotations

from collections import Counter

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from shards.store.remote import FETCH_COUNTS, take_counters


class RunCounters:
    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.bad_samples = 0  # unreadable samples left out so far, all ranks (as of the last count)
        self.bad_samples_here = 0  # ... met by this rank since the last count
        self.fetches: dict[str, int] = {}  # a remote split's fetches so far, all ranks (shards.store.remote.counters)
        self.fetches_here: Counter[str] = Counter()  # ... by this rank and its workers since the last count
        self.step_totals: dict[str, torch.Tensor] = {}  # the plugin's step_totals, this rank, this step
        self.step_total_names: list[str] | None = None

    def met(self, bad_samples: int, fetch_counts: dict[str, int]) -> None:
        """A micro-batch's share: what its loader skipped and fetched."""
        self.bad_samples_here += bad_samples
        self.fetches_here.update(fetch_counts)

    def add_step_totals(self, totals: dict[str, torch.Tensor]) -> None:
        for name, value in totals.items():
            self.step_totals[name] = self.step_totals.get(name, 0.0) + value.detach().double()

    def forget_since_last_count(self) -> None:
        """A rollback undoes the steps since the checkpoint: what they met is not the run's."""
        self.bad_samples_here, self.fetches_here, self.step_totals = 0, Counter(), {}

    def summed_step_totals(self) -> dict[str, float]:
        """This step's step_totals summed over the whole global batch (the same on every rank), then reset."""
        here, self.step_totals = self.step_totals, {}
        if self.step_total_names is None:  # once: a rank whose micro-batches were all unreadable has none
            self.step_total_names = sorted(set().union(*gather_object([sorted(here)])))
        if not self.step_total_names:
            return {}
        device = self.accelerator.device
        sums = torch.stack(
            [torch.as_tensor(here.get(name, 0.0), dtype=torch.float64, device=device) for name in self.step_total_names]
        )
        return dict(zip(self.step_total_names, self.accelerator.reduce(sums, reduction="sum").tolist(), strict=True))

    def mean_metrics(self, sums: dict[str, torch.Tensor], counts: Counter[str]) -> dict[str, float]:
        """The plugin's metrics averaged over the micro-batches of every rank since the last log that gave
        each (none: a metric no micro-batch gave is left out)."""
        # agreed by all ranks at every log: a rank whose micro-batches were all unreadable has no names, and a
        # plugin may add metrics late (a discriminator from the step it starts)
        names = sorted(set().union(*gather_object([sorted(sums)])))
        zero = torch.zeros((), device=self.accelerator.device)
        totals = torch.stack(
            [*(sums.get(name, zero).to(zero.device) for name in names), *(zero + counts[name] for name in names)]
        )
        reduced = self.accelerator.reduce(totals, reduction="sum").tolist()
        return {
            name: total / count
            for name, total, count in zip(names, reduced[: len(names)], reduced[len(names) :], strict=True)
            if count
        }

    def count_bad_samples(self) -> int:
        """All ranks' unreadable samples so far."""
        here = torch.tensor([float(self.bad_samples_here)], device=self.accelerator.device)
        self.bad_samples += int(self.accelerator.reduce(here, reduction="sum").item())
        self.bad_samples_here = 0
        return self.bad_samples

    def count_fetches(self) -> dict[str, int]:
        """All ranks' remote-shard fetches so far: bytes, shards, retries, evictions."""
        self.fetches_here.update(take_counters())  # the prefetcher's, in this process
        here = torch.tensor([float(self.fetches_here[name]) for name in FETCH_COUNTS], dtype=torch.float64)
        totals = self.accelerator.reduce(here.to(self.accelerator.device), reduction="sum").tolist()
        self.fetches_here.clear()
        for name, total in zip(FETCH_COUNTS, totals, strict=True):
            self.fetches[name] = self.fetches.get(name, 0) + int(total)
        return dict(self.fetches)
