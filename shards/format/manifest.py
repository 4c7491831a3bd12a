"""`OUT/manifest.json`: the one description of a shard folder that every other tool reads.

`read_manifest` checks the whole structure once, where the file is read, so that no reader meets a
field of the wrong type: a damaged or hostile manifest is one line, "FILE: not a valid manifest: what".
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from shards.errors import UserError, check_structure, parse_json
from shards.format.shard_writer import TAR_BLOCK, sync_folder
from shards.regular_files import open_regular
from shards.store import remote

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"(train|val)-\d{6}\.tar")
MAX_IMAGE_SIZE = 8192  # `shards build --size` allows no more
MAX_SHARD_BYTES = 2**50  # what `shards build --shard-bytes` allows


class ManifestError(UserError):
    """OUT is not a readable shard folder; the message is one line for the user."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def write_manifest(out: Path, manifest: dict) -> None:
    temp = out / (MANIFEST_NAME + ".tmp")
    temp.write_bytes(manifest_bytes(manifest))
    os.replace(temp, out / MANIFEST_NAME)
    sync_folder(out)  # the rename itself must survive a power loss


class Record(BaseModel):
    """Strict JSON types (no "3" for 3, no true for 1); fields the readers do not use are let through."""

    model_config = ConfigDict(strict=True, extra="ignore")


Count = Annotated[int, Field(ge=0, lt=2**63)]


class ImageRecord(Record):
    size: Annotated[int, Field(ge=1, le=MAX_IMAGE_SIZE)]
    format: Literal["png", "jpg", "webp"]
    mode: Literal["RGB", "L"]
    channels: int

    @model_validator(mode="after")
    def _channels_of_mode(self) -> ImageRecord:
        if self.channels != len(self.mode):
            raise ValueError(f"channels {self.channels} does not match mode {self.mode}")
        return self


class ShardRecord(Record):
    # joined to OUT and opened: only names `shards build` writes (no '../', no 'pipe:')
    name: str
    count: Count
    bytes: Annotated[int, Field(ge=0, le=MAX_SHARD_BYTES)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

    @field_validator("name")
    @classmethod
    def _shard_name(cls, name: str) -> str:
        if not SHARD_NAME.fullmatch(name):
            raise ValueError(f"{name[:80]!r} is not a shard name (train-NNNNNN.tar or val-NNNNNN.tar)")
        return name

    @model_validator(mode="after")
    def _fits(self) -> ShardRecord:
        if self.count * 2 * TAR_BLOCK > self.bytes:  # a sample is at least two members' headers
            raise ValueError(f"{self.count} samples cannot fit in {self.bytes} bytes")
        return self


class SplitRecord(Record):
    count: Count
    shards: list[ShardRecord]

    @model_validator(mode="after")
    def _counts_add_up(self) -> SplitRecord:
        total = sum(shard.count for shard in self.shards)
        if total != self.count:
            raise ValueError(f"count {self.count} is not the sum of its shards' counts ({total})")
        return self


class SplitsRecord(Record):
    train: SplitRecord
    val: SplitRecord


class SkippedRecord(TypedDict):  # a TypedDict: five times faster than a model over 100,000 of them
    __pydantic_config__ = ConfigDict(strict=True)
    path: str
    reason: str


class SourceRecord(Record):
    fingerprint: str
    images: Count


class ManifestRecord(Record):
    format_version: int  # read_manifest refuses any other than FORMAT_VERSION first
    image: ImageRecord
    options: dict[str, Any]  # compared whole by a rerun of `shards build`, never read field by field
    labels: list[str] | None = None
    splits: SplitsRecord
    skipped: list[SkippedRecord]
    source: SourceRecord | None = None

    @model_validator(mode="after")
    def _names_and_labels_unique(self) -> ManifestRecord:
        for split in SPLITS:
            for shard in getattr(self.splits, split).shards:
                if not shard.name.startswith(f"{split}-"):
                    raise ValueError(f"splits.{split} lists {shard.name}, a shard of another split")
        names = [shard.name for split in SPLITS for shard in getattr(self.splits, split).shards]
        if len(set(names)) != len(names):
            raise ValueError(f"a shard is listed twice ({sorted(name for name in names if names.count(name) > 1)[0]})")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("a label is listed twice")
        return self


def read_manifest(out: Path) -> dict:
    """The manifest of shard folder OUT, its structure checked (the JSON as read, as a dict)."""
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{out} is not a shard folder: {MANIFEST_NAME} is missing (build it with `shards build`)")
    try:
        with open_regular(path) as file:
            size, limit = os.fstat(file.fileno()).st_size, remote.MAX_RECORD_FILE_BYTES
            if size > limit:
                raise ManifestError(f"{path}: {size} bytes, more than the {limit} bytes such a file may weigh")
            data = file.read()
    except OSError as error:
        raise ManifestError(f"cannot read {path}: {error.strerror or error}") from None
    return parse_manifest(data, path)


def parse_manifest(data: bytes, where: object) -> dict:
    """A manifest's bytes (read from `where`, a path or a URL), its structure checked."""
    manifest = parse_json(data, where, "manifest", ManifestError)
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if type(version) is int and version != FORMAT_VERSION:  # checked first: a newer format may differ anywhere
        raise ManifestError(f"{where}: format_version {version} is not supported (expected {FORMAT_VERSION})")
    check_structure(ManifestRecord, manifest, where, "manifest", ManifestError)
    return manifest
