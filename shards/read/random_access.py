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
from collections import OrderedDict
from collections.abc import Iterator
from itertools import accumulate

import torch

from shards.errors import UserError
from shards.format import tar_index
from shards.read.reader import WHOLE, BadSample, ShardSplit, View, decode_sample
from shards.read.shard_cache import DamagedShard


class SampleError(UserError):
    """One sample of a shard cannot be read or decoded."""

    def __init__(self, shard: str, position: int, reason: str) -> None:
        super().__init__(f"{shard} sample {position}: {reason}")
        self.shard, self.position, self.reason = shard, position, reason


class ShardFile:
    """Shard `index` of a split, read by sample position: each sample's members named `extensions`.
    Opens its file lazily, once per process (DataLoader workers fork or spawn after construction and
    must not share a file offset), and can be closed (a remote shard's cached copy is evictable only
    while no process has it open)."""

    def __init__(self, split: ShardSplit, index: int, extensions: tuple[str, ...]) -> None:
        self.split, self.index, self.extensions = split, index, extensions
        self.location = split.shard_location(index)
        self._members: list[dict[str, tar_index.Member]] | None = None
        self._damage = ""  # why the listing ended early, if it did
        self._unfetchable = ""  # why this process cannot get the (remote) shard at all, if it cannot
        self._file = None
        self._pid = -1
        self._listed_size: int | None = None  # the file's size when its headers were listed

    def _open(self):
        if self._pid != os.getpid() or self._file is None:
            if self._file is not None:  # this process's copy of its parent's file: a held shard, let go
                self._file.close()
            self._file = self.split.open_shard(self.index)
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def _index(self) -> list[dict[str, tar_index.Member]]:
        """The members of each sample, from the tar headers. A truncation or a damaged header ends the
        listing: what comes before stays readable, what is missing fails in read()."""
        members = []
        self._listed_size = os.fstat(self._open().fileno()).st_size
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
        if self._unfetchable:
            raise SampleError(self.location, position, self._unfetchable)
        try:
            return self._read(position)
        except DamagedShard as error:  # a remote shard whose download never matched: not fetched again here
            self._unfetchable = str(error)
            raise SampleError(self.location, position, self._unfetchable) from None

    def _read(self, position: int) -> dict[str, bytes]:
        count = len(self)
        if position >= count:
            why = self._damage or "truncated?"
            raise SampleError(self.location, position, f"the shard ends after {count} samples ({why})")
        members = self._members[position]
        missing = [f".{extension}" for extension in self.extensions if extension not in members]
        if missing and self._damage and position == count - 1:
            held = ", ".join(f".{extension}" for extension in members)
            raise SampleError(self.location, position, f"the shard ends after its {held} ({self._damage})")
        if missing:
            raise SampleError(self.location, position, f"it has no {' or '.join(missing)}")
        file = self._open()
        try:
            wanted = [members[extension] for extension in self.extensions]
            data = tar_index.read_sample(file, wanted, self._listed_size)
            return dict(zip(self.extensions, data, strict=True))
        except tar_index.DamagedTar as error:
            raise SampleError(self.location, position, str(error)) from None


class SplitDataset(torch.utils.data.Dataset):
    """Sample i of the split (shards in manifest order) as (image CHW float in [-1, 1], label int); with
    `pixels`, the image as its uint8 pixels (what the training loader hands over: a quarter of the bytes
    to pass between processes and to the GPU, which scales them itself).

    Each process keeps at most `max_open` shards open, closing the least recently read: a remote shard's
    cached copy can be evicted only once no process holds it (the training order reads a few shards at a
    time, data.shuffle_shards of them)."""

    def __init__(self, split: ShardSplit, max_open: int | None = None, pixels: bool = False) -> None:
        self.split, self.max_open, self.pixels = split, max_open, pixels
        extensions = ("json", split.image["format"])
        self.shards = [ShardFile(split, index, extensions) for index in range(len(split.shards))]
        self.counts = [shard["count"] for shard in split.shards]
        self.starts = [0, *accumulate(self.counts)]
        self.recently_read: OrderedDict[int, None] = OrderedDict()  # this process's open shards, oldest first

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
        self.recently_read.clear()

    def _mark_read(self, shard: int) -> None:
        if self.max_open is None:
            return
        self.recently_read[shard] = None
        self.recently_read.move_to_end(shard)
        while len(self.recently_read) > self.max_open:
            oldest, _ = self.recently_read.popitem(last=False)
            self.shards[oldest].close()

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.read(index)

    def read(self, index: int, view: View = WHOLE) -> tuple[torch.Tensor, int]:
        """Sample `index`, `view` of its image (a training sample's crop and mirror)."""
        shard, position = self.locate(index)
        source = self.shards[shard]
        self._mark_read(shard)
        try:
            return decode_sample(source.read(position), self.split.image, self.pixels, view)
        except UserError:  # SampleError, or the store or the cache failing: not this sample's fault
            raise
        except BadSample as error:
            reason = str(error)
        except Exception as error:  # decoding damaged bytes raises anything from OSError to SyntaxError
            reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise SampleError(source.location, position, reason)


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
