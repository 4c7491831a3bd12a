"""Writes one shard: a tar under a temporary name, hashed as it is written, fsynced, then renamed.
A shard file that exists under its final name is therefore always complete."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import webdataset as wds

# Fixed tar metadata so that the same samples give byte-identical shards.
TAR_MTIME = 0.0
TAR_OWNER = "shards"
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to whole records


def _member_bytes(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


class _HashingFile:
    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.file.write(data)


class ShardWriter:
    def __init__(self, final_path: Path, temp_dir: Path) -> None:
        self.final_path = final_path
        self.temp_path = temp_dir / (final_path.name + ".tmp")
        self._file = open(self.temp_path, "wb")  # noqa: SIM115 - closed in finish()
        self._hashing = _HashingFile(self._file)
        self._tar = wds.TarWriter(
            self._hashing, user=TAR_OWNER, group=TAR_OWNER, mode=0o444, encoder=False, mtime=TAR_MTIME
        )
        self.count = 0
        self._member_bytes = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        self._tar.write({"__key__": key, **members})
        self._member_bytes += sum(_member_bytes(len(data)) for data in members.values())
        self.count += 1

    def tar_bytes_with(self, members: Iterable[bytes]) -> int:
        """The exact size the finished file would have if these members were added."""
        body = self._member_bytes + sum(_member_bytes(len(data)) for data in members) + 2 * TAR_BLOCK
        return -(-body // TAR_RECORD) * TAR_RECORD

    def finish(self) -> dict:
        """Close, make durable, publish; returns the manifest's record of this shard."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temp_path, self.final_path)
        return {
            "name": self.final_path.name,
            "count": self.count,
            "bytes": self._hashing.bytes,
            "sha256": self._hashing.sha256.hexdigest(),
        }
