"""Random access to the samples of a split: a map-style torch Dataset over the shards.

Each shard's member offsets are read once per process from its tar headers (no extraction, no
copy); a sample is then one seek and one read. Random access lets the trainer give every rank an
exact, equal share of each epoch and resume at an exact sample position, which streaming a shard
per rank cannot do when shard counts or sizes do not divide evenly.

A shard damaged after it was built (truncated by a failed copy, bytes overwritten) fails per sample:
reading a sample it no longer holds, or one that does not decode, raises SampleError naming the shard
and the position, and the other samples stay readable.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path

import torch

from shards import tar_index
from shards.errors import UserError
from shards.reader import BadSample, ShardSplit, decode_sample


class SampleError(UserError):
    """One sample of a shard cannot be read or decoded."""

    def __init__(self, shard: Path, position: int, reason: str) -> None:
        super().__init__(f"{shard.name} sample {position}: {reason}")
        self.shard, self.position, self.reason = shard, position, reason


class ShardFile:
    """One shard, read by sample position: each sample's members named `extensions`. Opens its file
    lazily, once per process (DataLoader workers fork or spawn after construction and must not share a
    file offset)."""

    def __init__(self, path: Path, extensions: tuple[str, ...]) -> None:
        self.path, self.extensions = path, extensions
        self._members: list[dict[str, tar_index.Member]] | None = None
        self._damage = ""  # why the listing ended early, if it did
        self._file = None
        self._pid = -1

    def _open(self):
        if self._pid != os.getpid():
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for the life of the process
            self._pid = os.getpid()
        return self._file

    def _index(self) -> list[dict[str, tar_index.Member]]:
        """The members of each sample, from the tar headers. A truncation or a damaged header ends the
        listing: what comes before stays readable, what is missing fails in read()."""
        members = []
        try:
            for _, sample in tar_index.samples(self._open()):
                members.append(sample)
        except tar_index.DamagedTar as error:
            self._damage = str(error)
        return members

    def __len__(self) -> int:
        if self._members is None:
            self._members = self._index()
        return len(self._members)

    def read(self, position: int) -> dict[str, bytes]:
        count = len(self)
        if position >= count:
            why = self._damage or "truncated?"
            raise SampleError(self.path, position, f"the shard ends after {count} samples ({why})")
        members = self._members[position]
        missing = [f".{extension}" for extension in self.extensions if extension not in members]
        if missing and self._damage and position == count - 1:
            held = ", ".join(f".{extension}" for extension in members)
            raise SampleError(self.path, position, f"the shard ends after its {held} ({self._damage})")
        if missing:
            raise SampleError(self.path, position, f"it has no {' or '.join(missing)}")
        file = self._open()
        try:
            return {extension: tar_index.read(file, members[extension]) for extension in self.extensions}
        except tar_index.DamagedTar as error:
            raise SampleError(self.path, position, str(error)) from None


class SplitDataset(torch.utils.data.Dataset):
    """Sample i of the split (shards in manifest order) as (image CHW float in [-1, 1], label int)."""

    def __init__(self, split: ShardSplit) -> None:
        self.split = split
        extensions = ("json", split.image["format"])
        self.shards = [ShardFile(split.root / shard["name"], extensions) for shard in split.shards]
        self.counts = [shard["count"] for shard in split.shards]
        self.starts = [0, *accumulate(self.counts)]

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        shard, position = self.locate(index)
        source = self.shards[shard]
        try:
            return decode_sample(source.read(position), self.split.image)
        except SampleError:
            raise
        except BadSample as error:
            reason = str(error)
        except Exception as error:  # decoding damaged bytes raises anything from OSError to SyntaxError
            reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise SampleError(source.path, position, reason)


def first_images(
    dataset: SplitDataset,
    count: int,
    label: int | None = None,
    exclude: int | None = None,
    skip_unreadable: bool = False,
) -> Iterator[tuple[torch.Tensor, int]]:
    """The split's first `count` samples in shard order, lazily: optionally only those with (or without)
    a label index, and past unreadable ones (else a SampleError names the first). What the trainer's
    grids, `pipeline reconstruct` and friends, and `pipeline evaluate` all read."""
    found = 0
    for index in range(len(dataset)):
        if found == count:
            return
        try:
            image, image_label = dataset[index]
        except SampleError:
            if skip_unreadable:
                continue
            raise
        if (label is None or image_label == label) and (exclude is None or image_label != exclude):
            found += 1
            yield image, image_label
