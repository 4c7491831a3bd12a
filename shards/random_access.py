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
import contextlib
import json
import os
import tarfile
from itertools import accumulate
from pathlib import Path

import torch

from shards.errors import UserError
from shards.reader import NO_LABEL, ShardSplit, image_to_tensor


class SampleError(UserError):
    """One sample of a shard cannot be read or decoded."""

    def __init__(self, shard: Path, position: int, reason: str) -> None:
        super().__init__(f"{shard.name} sample {position}: {reason}")
        self.shard, self.position, self.reason = shard, position, reason


class ShardFile:
    """One shard, read by sample position. Opens its file lazily, once per process (DataLoader
    workers fork or spawn after construction and must not share a file offset)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._members: list[dict[str, tuple[int, int]]] | None = None
        self._file = None
        self._pid = -1

    def _index(self) -> list[dict[str, tuple[int, int]]]:
        members: list[dict[str, tuple[int, int]]] = []
        last_key = None
        # tarfile ends the listing quietly at a truncation or an overwritten header (and raises only when
        # the very first header is cut): what comes before stays readable, what is missing fails in read()
        with contextlib.suppress(tarfile.ReadError, EOFError), tarfile.open(self.path, "r:") as tar:
            for info in tar:
                key, _, extension = info.name.partition(".")
                if key != last_key:
                    members.append({})
                    last_key = key
                members[-1][extension] = (info.offset_data, info.size)
        return members

    def __len__(self) -> int:
        if self._members is None:
            self._members = self._index()
        return len(self._members)

    def read(self, position: int) -> dict[str, bytes]:
        if self._members is None:
            self._members = self._index()
        if position >= len(self._members):
            raise SampleError(self.path, position, f"the shard ends after {len(self._members)} samples (truncated?)")
        if self._pid != os.getpid():
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for the life of the process
            self._pid = os.getpid()
        sample = {}
        for extension, (offset, size) in self._members[position].items():
            self._file.seek(offset)
            sample[extension] = self._file.read(size)
            if len(sample[extension]) != size:
                raise SampleError(self.path, position, f"its .{extension} is cut short (the shard is truncated)")
        return sample


class SplitDataset(torch.utils.data.Dataset):
    """Sample i of the split (shards in manifest order) as (image CHW float in [-1, 1], label int)."""

    def __init__(self, split: ShardSplit) -> None:
        self.split = split
        self.shards = [ShardFile(split.root / shard["name"]) for shard in split.shards]
        self.counts = [shard["count"] for shard in split.shards]
        self.starts = [0, *accumulate(self.counts)]

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        shard, position = self.locate(index)
        try:
            sample = self.shards[shard].read(position)
            meta = json.loads(sample["json"])
            image = image_to_tensor(sample[self.split.image["format"]], self.split.image["mode"])
        except SampleError:
            raise
        except Exception as error:  # decoding damaged bytes raises anything from OSError to SyntaxError
            reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            raise SampleError(self.shards[shard].path, position, reason) from None
        return image, meta.get("label", NO_LABEL)
