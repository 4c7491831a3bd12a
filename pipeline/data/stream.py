"""The training data stream: exact epochs, split across ranks, resumable at any micro-step.

Per epoch, the shard order is shuffled from (seed, epoch), and the samples of each group of
`shuffle_shards` consecutive shards are shuffled together. The resulting epoch order is cut into
global micro-batches of world_size x batch_size samples; rank r takes the r-th slice of each. So:

- each sample is seen once per epoch, on one rank, in one DataLoader worker; the last partial
  global micro-batch of an epoch (fewer than world_size x batch_size samples) is dropped;
- every rank runs the same number of micro-steps, whatever the shard counts (no hang);
- the stream is a pure function of (seed, global micro-step), so a run resumes at an exact sample.

A sample that cannot be read (its shard was truncated or damaged after the build) is left out of its
micro-batch and counted; the first one of each shard is reported on stderr by the process that met it.
A remote store that fails for good (or for longer than data.retry_seconds), or a full cache disk, is no
sample's fault: the micro-batch carries the error to the rank, which stops with that one line.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
import torch

from pipeline.config.sections import DataConfig
from pipeline.data.workers import guard_worker
from shards.command_line import one_line
from shards.read.random_access import SampleError, SplitDataset
from shards.read.reader import ShardSplit, View, to_unit_range
from shards.read.shard_cache import CacheFull
from shards.store.failures import StoreError, StoreUnavailable
from shards.store.remote import take_counters


@dataclass(frozen=True)
class StreamLayout:
    counts: tuple[int, ...]  # samples per shard, manifest order
    seed: int
    shuffle_shards: int
    world_size: int
    batch_size: int

    @classmethod
    def of(cls, split: ShardSplit, seed: int, data: DataConfig, world_size: int) -> StreamLayout:
        counts = tuple(shard["count"] for shard in split.shards)
        return cls(counts, seed, data.shuffle_shards, world_size, data.batch_size)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.counts) // self.global_batch


def epoch_groups(layout: StreamLayout, epoch: int) -> list[np.ndarray]:
    """The epoch's shard groups, as arrays of shard indices, in reading order."""
    order = np.random.default_rng([layout.seed, epoch]).permutation(len(layout.counts))
    return [order[start : start + layout.shuffle_shards] for start in range(0, len(order), layout.shuffle_shards)]


def epoch_order(layout: StreamLayout, epoch: int, skip: int = 0) -> Iterator[int]:
    """Global sample indices of the epoch in training order, from position `skip` on."""
    starts = [0, *accumulate(layout.counts)]
    for number, group in enumerate(epoch_groups(layout, epoch)):
        size = sum(layout.counts[shard] for shard in group)
        if skip >= size:  # whole groups before the resume point are never materialised
            skip -= size
            continue
        members = np.concatenate([np.arange(starts[shard], starts[shard + 1]) for shard in group])
        shuffled = members[np.random.default_rng([layout.seed, epoch, number]).permutation(size)]
        yield from shuffled[skip:].tolist()
        skip = 0


def data_position(layout: StreamLayout, micro_step: int) -> dict[str, int]:
    """Where the stream stands after `micro_step` global micro-batches, in terms that do not depend on
    the number of ranks: the epoch and the number of its samples already consumed."""
    epoch, in_epoch = divmod(micro_step, layout.steps_per_epoch)
    return {
        "micro_step": micro_step,
        "epoch": epoch,
        "sample_in_epoch": in_epoch * layout.global_batch,
        "global_batch": layout.global_batch,
        "samples": sum(layout.counts),
        "seed": layout.seed,
        "shuffle_shards": layout.shuffle_shards,
    }


def resume_micro_step(position: dict[str, int], layout: StreamLayout) -> int:
    """The global micro-step at which `layout` continues a stream saved at `position`. With the same
    global micro-batch (world_size x batch_size) it is the saved one: the stream continues exactly.
    Otherwise the same epoch continues from the saved sample position rounded down to a whole global
    micro-batch of the new layout: at most global_batch - 1 samples of that epoch are seen twice,
    none is skipped (an epoch order does not depend on the number of ranks)."""
    if position["global_batch"] == layout.global_batch:
        return position["micro_step"]
    in_epoch = position["sample_in_epoch"] // layout.global_batch
    epoch = position["epoch"]
    if in_epoch >= layout.steps_per_epoch:  # only the new layout's dropped tail of the epoch was left
        epoch, in_epoch = epoch + 1, 0
    return epoch * layout.steps_per_epoch + in_epoch


class RankBatches(torch.utils.data.Sampler[list[int]]):
    """This rank's micro-batches, from global micro-step `start` on, for ever. Each item is
    epoch x samples + sample index, so that per-epoch augmentation can be keyed on the sample."""

    def __init__(self, layout: StreamLayout, rank: int, start: int = 0) -> None:
        if layout.steps_per_epoch == 0:
            raise ValueError(
                f"the split has {sum(layout.counts)} samples, fewer than one global micro-batch "
                f"({layout.world_size} ranks x {layout.batch_size})"
            )
        self.layout, self.rank, self.start = layout, rank, start

    def __iter__(self) -> Iterator[list[int]]:
        layout, step = self.layout, self.start
        while True:
            epoch, in_epoch = divmod(step, layout.steps_per_epoch)
            order = epoch_order(layout, epoch, skip=in_epoch * layout.global_batch)
            offset = epoch * sum(layout.counts)
            for _ in range(in_epoch, layout.steps_per_epoch):
                micro_batch = [offset + next(order) for _ in range(layout.global_batch)]
                yield micro_batch[self.rank * layout.batch_size : (self.rank + 1) * layout.batch_size]
                step += 1


def flipped(seed: int, epoch: int, index: int) -> bool:
    """hflip: whether sample `index` is mirrored in `epoch` (the same on any number of ranks)."""
    return hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=1).digest()[0] < 128


def crop_offset(seed: int, epoch: int, index: int, stored: int, size: int) -> tuple[int, int]:
    """data.random_crop: the (top, left) of sample `index`'s size x size crop in `epoch` (the same on any
    number of ranks, and again on resume: a function of the stream's position, like the flip)."""
    digest = hashlib.blake2b(f"crop:{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    positions = stored - size + 1
    return int.from_bytes(digest[:4], "little") % positions, int.from_bytes(digest[4:], "little") % positions


def center_crop(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """The middle size x size of a C x H x W (or N x C x H x W) image: what grids and evaluation show a model
    trained on random crops (None: the image)."""
    if size is None:
        return image
    top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
    return image[..., top : top + size, left : left + size]


class CenterCropped:
    """A split's samples, each center-cropped: evaluation of a model trained on data.random_crop."""

    def __init__(self, dataset: SplitDataset, size: int) -> None:
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return center_crop(image, self.size), label

    def close(self) -> None:
        self.dataset.close()


def model_image(split: ShardSplit, data: DataConfig) -> dict:
    """The images the model sees (the shards' image description, at data.random_crop's size when set):
    what a plugin is built for and a weights folder records."""
    return {**split.image, "size": data.random_crop or split.image["size"]}


class TrainingSamples(torch.utils.data.Dataset):
    """The split's samples, addressed as epoch x samples + index (RankBatches' items), with the random crop
    and the paper's random horizontal flip when asked for. An unreadable sample comes out as None (see
    collate)."""

    def __init__(self, split: SplitDataset, seed: int, hflip: bool, rank: int = 0, crop: int | None = None) -> None:
        self.split, self.seed, self.hflip, self.rank, self.crop = split, seed, hflip, rank, crop
        self.reported: set[str] = set()  # shards already reported by this process

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int] | DataFailure | None:
        epoch, index = divmod(item, len(self.split))
        window = None
        if self.crop is not None:
            top, left = crop_offset(self.seed, epoch, index, self.split.split.image["size"], self.crop)
            window = (top, left, self.crop)
        view = View(window, self.hflip and flipped(self.seed, epoch, index))
        try:
            image, label = self.split.read(index, view)
        except (StoreError, StoreUnavailable, CacheFull) as error:
            return DataFailure(str(error))
        except SampleError as error:
            if error.shard not in self.reported:
                self.reported.add(error.shard)
                print(
                    one_line(
                        f"pipeline train: warning: rank {self.rank}: {error.shard}: sample {error.position} is "
                        f"unreadable ({error.reason}); this shard's bad samples are skipped and counted (bad_samples)"
                    ),
                    file=sys.stderr,
                    flush=True,
                )
            return None
        return image, label


@dataclass(frozen=True)
class DataFailure:
    """What a worker could not get from the store or the cache: the rank stops with this line."""

    message: str


@dataclass
class MicroBatch:
    # uint8 pixels, N x C x H x W: the trainer scales them to [-1, 1] on its device (shards.read.reader.to_unit_range)
    images: torch.Tensor | None  # None when every sample of the micro-batch was unreadable
    labels: torch.Tensor | None
    bad_samples: int
    fetch_counts: dict[str, int] = field(default_factory=dict)  # shards.store.remote.counters of the worker
    failure: str | None = None

    def on_device(self, image, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(images in [-1, 1] as `dtype`, labels) on `device`; image: the model's ImageInfo, for the empty
        micro-batch of one whose every sample was unreadable (it still takes part in the step)."""
        images, labels = self.images, self.labels
        if images is None:
            images = torch.empty(0, image.channels, image.size, image.size, dtype=torch.uint8)
            labels = torch.empty(0, dtype=torch.int64)
        # scaled where the model runs: a quarter of the bytes cross to the GPU; the same float32 values
        images = to_unit_range(images.to(device, non_blocking=True)).to(dtype)
        return images, labels.to(device, non_blocking=True)

    def pin_memory(self) -> MicroBatch:  # the DataLoader's pin_memory=True calls this on custom batches
        if self.images is not None:
            self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()
        return self


def collate(samples: list[tuple[torch.Tensor, int] | DataFailure | None]) -> MicroBatch:
    """Stack the readable samples; count the others. The micro-batch gets smaller rather than taking
    samples from elsewhere in the stream, which would shift every later batch and break exact resume.
    Runs where the samples were read (a worker), so it also carries that process's fetch counters."""
    counts = take_counters()
    failures = [sample.message for sample in samples if isinstance(sample, DataFailure)]
    if failures:
        return MicroBatch(None, None, 0, counts, failures[0])
    good = [sample for sample in samples if sample is not None]
    bad = len(samples) - len(good)
    if not good:
        return MicroBatch(None, None, bad, counts)
    images, labels = torch.utils.data.default_collate(good)
    return MicroBatch(images, labels, bad, counts)


def training_loader(
    split: ShardSplit,
    layout: StreamLayout,
    rank: int,
    start: int,
    workers: int,
    hflip: bool = False,
    pin_memory: bool = False,
    crop: int | None = None,
) -> torch.utils.data.DataLoader:
    # a worker keeps open the shards the epoch order is reading (a group of shuffle_shards), no more
    samples = SplitDataset(split, max_open=layout.shuffle_shards, pixels=True)
    dataset = TrainingSamples(samples, layout.seed, hflip, rank, crop)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=RankBatches(layout, rank, start),
        collate_fn=collate,
        worker_init_fn=guard_worker,  # SIGTERM from SLURM left to the rank; dies with the rank
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        # its own generator: otherwise each iterator draws its workers' base seed from the global RNG,
        # shifting the plugin's random stream (and our samples need no worker randomness)
        generator=torch.Generator().manual_seed(layout.seed),
        prefetch_factor=4 if workers > 0 else None,
    )
