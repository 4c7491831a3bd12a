"""The reader of the shard format: a webdataset pipeline of (image, label) pairs.

Images come out as float CHW tensors in [-1, 1] (C = 3 for RGB, 1 for L); labels as ints, -1 where
the build had none. The pipeline splits shards across nodes (torch.distributed ranks) and across
DataLoader workers; the trainer's data module adds epochs and exact positions on top of it.
"""

from __future__ import annotations

import functools
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from shards.format.manifest import SPLITS, ManifestError
from shards.format.samples import SHARD_FORMATS
from shards.read.folder import ShardFolder
from shards.read.shard_cache import ShardCache
from shards.store.remote import RemoteAccess, RemoteFolder

NO_LABEL = -1


@dataclass(frozen=True)
class ShardSplit:
    """One split of a shard folder (local or remote, shards/read/folder.py), as its manifest describes it."""

    folder: ShardFolder
    split: str
    shards: tuple[dict, ...]
    image: dict
    labels: tuple[str, ...] | None

    @property
    def location(self) -> str:
        return self.folder.location

    @property
    def remote(self) -> RemoteFolder | None:
        return self.folder.remote

    @property
    def cache(self) -> ShardCache | None:
        return self.folder.cache

    def shard_location(self, index: int) -> str:
        return self.folder.shard_location(self.shards[index]["name"])

    def open_shard(self, index: int) -> BinaryIO:
        return self.folder.open(self.shards[index])

    @property
    def urls(self) -> list[str]:
        return [self.shard_location(index) for index in range(len(self.shards))]

    @property
    def count(self) -> int:
        return sum(shard["count"] for shard in self.shards)


def open_split(
    out: str | Path, split: str = "train", access: RemoteAccess | None = None, check_shards: bool = True
) -> ShardSplit:
    """The split of shard folder OUT: a local folder or a remote URL (s3://, gs://, http(s)://). Every
    shard the manifest names must be there (for a remote folder: at its manifest size; checked only
    with `check_shards`, a request per shard, which one rank of a run is enough to make)."""
    if split not in SPLITS:
        raise ManifestError(f"unknown split {split!r}; a shard folder has {', '.join(SPLITS)}")
    folder = ShardFolder.at(out, access)
    manifest = folder.manifest()
    shards = split_shards(manifest, split, folder.location)
    if check_shards or folder.remote is None:
        folder.check_shards(shards)
    if check_shards:  # one rank of a run says it
        warn_if_cache_too_small(folder, shards)
    return ShardSplit(folder, split, shards, manifest["image"], labels_of(manifest))


def warn_if_cache_too_small(folder: ShardFolder, shards: tuple[dict, ...]) -> None:
    """A cache limit below one shard cannot be kept: every shard is fetched whole, then the cache holds
    it (and the others in use) whatever the limit. Said once, at start-up, not found out from the disk."""
    limit = folder.cache.limit if folder.cache is not None else None
    largest = max(shards, key=lambda shard: shard["bytes"])
    if limit is not None and largest["bytes"] > limit:
        print(
            f"warning: data.cache_limit ({limit} bytes) is smaller than a shard ({largest['name']}, "
            f"{largest['bytes']} bytes): the cache holds every shard in use whatever the limit; give it at least "
            "data.shuffle_shards x the largest shard",
            file=sys.stderr,
            flush=True,
        )


def split_shards(manifest: dict, split: str, where: object) -> tuple[dict, ...]:
    shards = tuple(manifest["splits"][split]["shards"])
    if not shards:
        raise ManifestError(f"{where}: split {split!r} is empty")
    return shards


def labels_of(manifest: dict) -> tuple[str, ...] | None:
    labels = manifest.get("labels")
    return tuple(labels) if labels else None


class BadSample(ValueError):
    """A sample whose members are missing, or whose image or metadata is not what the manifest says."""


@dataclass(frozen=True)
class View:
    """The part of a decoded image a training sample is: a square window (top, left, side) of it, or all of
    it (None), mirrored left to right or not."""

    window: tuple[int, int, int] | None = None
    mirrored: bool = False


WHOLE = View()


def image_to_pixels(data: bytes, mode: str, size: int | None = None, view: View = WHOLE) -> torch.Tensor:
    """Encoded image bytes to its pixels as decoded, `view` of them: a uint8 CHW tensor. With `size`, an
    image of any other size is refused from its header, before its pixels are decoded (a damaged header
    must not size an allocation)."""
    with Image.open(io.BytesIO(data), formats=SHARD_FORMATS) as image:
        if size is not None and image.size != (size, size):
            raise BadSample(f"its image is {image.size[0]}x{image.size[1]}, the manifest says {size}x{size}")
        # convert() copies even to the image's own mode
        pixels = np.asarray(image if image.mode == mode else image.convert(mode))
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if view.window is not None:
        top, left, side = view.window
        pixels = pixels[top : top + side, left : left + side]
    if view.mirrored:
        pixels = pixels[:, ::-1]
    # the one (writable) copy torch needs, made in C x H x W order, the crop and the mirror done by it: a
    # contiguous tensor stacks into a micro-batch ~15x faster than a permuted view of H x W x C, and a
    # flip of the tensor afterwards was a second copy (a 32x32 training sample: 78 -> 71 us without it)
    return torch.from_numpy(np.array(pixels.transpose(2, 0, 1), order="C"))


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to float32 in [-1, 1] (p / 127.5 - 1), what the models take; on whatever device they are."""
    return pixels.float().div_(127.5).sub_(1.0)


def image_to_tensor(data: bytes, mode: str, size: int | None = None, view: View = WHOLE) -> torch.Tensor:
    """Encoded image bytes to a float CHW tensor in [-1, 1] (image_to_pixels, then to_unit_range)."""
    return to_unit_range(image_to_pixels(data, mode, size, view))


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """The inverse, for grids: a CHW tensor in [-1, 1] to a PIL image."""
    pixels = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def decode_sample(
    sample: dict[str, bytes], image: dict, pixels: bool = False, view: View = WHOLE
) -> tuple[torch.Tensor, int]:
    """(image, label) of one sample's members, `view` of the image, in [-1, 1] or, with `pixels`, as uint8
    pixels; BadSample when they are not what the manifest says."""
    missing = [f".{extension}" for extension in ("json", image["format"]) if extension not in sample]
    if missing:
        raise BadSample(f"it has no {' or '.join(missing)}")
    try:
        meta = json.loads(sample["json"])
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise BadSample(f"its .json does not parse ({error})") from None
    label = meta.get("label", NO_LABEL) if isinstance(meta, dict) else None
    if type(label) is not int or label < NO_LABEL:
        raise BadSample(f"its .json is not an object with an integer label >= {NO_LABEL}")
    decode = image_to_pixels if pixels else image_to_tensor
    return decode(sample[image["format"]], image["mode"], image["size"], view), label


def webdataset(
    split: ShardSplit,
    *,
    shuffle_shards: bool = False,
    seed: int = 0,
    nodesplitter=wds.split_by_node,
    workersplitter=wds.split_by_worker,
    handler=wds.reraise_exception,
) -> wds.WebDataset:
    """(image, label) pairs of the split. By default each rank reads every world_size-th shard and
    each DataLoader worker every num_workers-th of those: with shards >= ranks x workers every
    sample is read once per pass."""
    dataset = wds.WebDataset(
        split.urls,
        shardshuffle=len(split.urls) if shuffle_shards else False,
        seed=seed,
        nodesplitter=nodesplitter,
        workersplitter=workersplitter,
        handler=handler,
        empty_check=False,
    )
    return dataset.map(functools.partial(decode_sample, image=split.image), handler=handler)
