"""Writes one shard: a tar under a temporary name, hashed as it is written, fsynced, then renamed.
A shard file that exists under its final name is therefore always complete.

The layout is webdataset's (members `<key>.<ext>`, a sample's members adjacent, extensions sorted,
USTAR), written with the standard library's tarfile rather than webdataset.TarWriter: importing
webdataset imports torch, which costs every build process about 1 s and 210 MB (bench/shards_build.py).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

# Fixed tar metadata so that the same samples give byte-identical shards.
TAR_MTIME = 0
TAR_OWNER = "shards"
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to whole records


def _member_bytes(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a power loss could otherwise undo it after the journal records it)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class _HashingFile:
    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        written = self.file.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return written

    def tell(self) -> int:
        return self.bytes


class ShardWriter:
    def __init__(self, final_path: Path, temp_dir: Path) -> None:
        self.final_path = final_path
        self.temp_path = temp_dir / (final_path.name + ".tmp")
        self._file = open(self.temp_path, "wb")  # noqa: SIM115 - closed in finish()
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w:", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.count = 0
        self._member_bytes = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for extension in sorted(members):
            data = members[extension]
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
            info.uname = info.gname = TAR_OWNER
            self._tar.addfile(info, io.BytesIO(data))
        self._member_bytes += sum(_member_bytes(len(data)) for data in members.values())
        self.count += 1

    def tar_bytes_with(self, members: Iterable[bytes]) -> int:
        """The exact size the finished file would have if these members were added."""
        body = self._member_bytes + sum(_member_bytes(len(data)) for data in members) + 2 * TAR_BLOCK
        return -(-body // TAR_RECORD) * TAR_RECORD

    def abort(self) -> None:
        """After a failed write: drop the partial file; the shard is redone by the next run."""
        self._file.close()
        self.temp_path.unlink(missing_ok=True)

    def finish(self) -> dict:
        """Close, make durable, publish; returns the manifest's record of this shard."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temp_path, self.final_path)
        sync_folder(self.final_path.parent)
        return {
            "name": self.final_path.name,
            "count": self.count,
            "bytes": self._hashing.bytes,
            "sha256": self._hashing.sha256.hexdigest(),
        }
