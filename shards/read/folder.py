"""A shard folder wherever it is: a local folder, or a remote one (s3://, gs://, http(s)://) read through the
node-local cache. What every reader of shards (the trainer, `shards verify` and `inspect`, the model
commands) opens, so that none of them cares where the bytes are."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from shards.format.manifest import MANIFEST_NAME, ManifestError, parse_manifest, read_manifest
from shards.read.shard_cache import ShardCache
from shards.store.failures import StoreNotFound
from shards.store.remote import RemoteAccess, RemoteFolder, is_remote


@dataclass(frozen=True)
class ShardFolder:
    root: Path | None  # a local folder, absolute; None for a remote one
    remote: RemoteFolder | None = None
    cache: ShardCache | None = None

    @classmethod
    def at(cls, location: str | Path, access: RemoteAccess | None = None) -> ShardFolder:
        if is_remote(location):
            access = access or RemoteAccess()
            remote = access.folder(str(location))
            return cls(None, remote, ShardCache(access.cache_dir, access.cache_limit))
        return cls(Path(location).resolve())  # absolute: webdataset must never take a name for pipe: or a URL

    @property
    def location(self) -> str:
        """The folder as a user names it: a path or a URL."""
        return self.remote.url if self.remote is not None else str(self.root)

    def shard_location(self, name: str) -> str:
        return self.remote.url_of(name) if self.remote is not None else str(self.root / name)

    def manifest(self) -> dict:
        if self.remote is None:
            return read_manifest(self.root)
        return parse_manifest(self.remote.read_bytes(MANIFEST_NAME), self.remote.url_of(MANIFEST_NAME))

    def open(self, record: dict) -> BinaryIO:
        """A shard opened for reading: the local file, or its copy in the node-local cache (fetched and
        checked first if need be), held in use until closed."""
        if self.remote is None:
            return open(self.root / record["name"], "rb")
        return self.cache.open(self.remote, record)

    def local_path(self, record: dict) -> Path:
        """A shard as a local file: itself, or its checked copy in the cache."""
        if self.remote is None:
            return self.root / record["name"]
        return self.cache.fetch(self.remote, record)

    def check_shards(self, shards: tuple[dict, ...]) -> None:
        """Every shard is there (a remote one at its manifest size): one metadata request per remote shard,
        a few at a time; no shard is read."""
        if not shards:
            return
        if self.remote is None:
            missing = [shard["name"] for shard in shards if not (self.root / shard["name"]).is_file()]
            if missing:
                raise ManifestError(
                    f"{self.root}: {len(missing)} shard(s) of the manifest are missing, first {missing[0]}"
                )
            return
        with ThreadPoolExecutor(max_workers=min(16, len(shards))) as pool:
            wrong = [problem for problem in pool.map(self._not_as_built, shards) if problem]
        if wrong:
            raise ManifestError(
                f"{self.remote.url}: {len(wrong)} shard(s) of the manifest are missing or not their size, "
                f"first {wrong[0]}"
            )

    def _not_as_built(self, shard: dict) -> str | None:
        try:
            size = self.remote.size(shard["name"])
        except StoreNotFound:
            return f"{shard['name']} (not found)"
        return None if size == shard["bytes"] else f"{shard['name']} ({size} bytes, the manifest says {shard['bytes']})"
