"""Where `shards build` puts what it makes: OUT itself, or a remote OUT (s3://, gs://) behind a local
staging folder.

A remote build writes its shards and its journal in the staging folder exactly as a local build writes
them in OUT (so the bytes cannot differ), uploads each shard as soon as it is finished and then drops the
local copy, and uploads the manifest last: a reader never finds a manifest naming a shard that is not
there. The journal stays local, in the staging folder (by default under the system's temporary folder,
per OUT URL): an interrupted build resumes on the same machine; elsewhere it starts over, and re-uploads
shards byte-identical to the ones already there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from shards.errors import UserError, without_credentials
from shards.format.manifest import (
    MANIFEST_NAME,
    SHARD_NAME,
    SPLITS,
    ManifestError,
    manifest_bytes,
    read_manifest,
    write_manifest,
)
from shards.progress import console
from shards.read.folder import ShardFolder
from shards.store.failures import StoreNotFound
from shards.store.remote import RemoteFolder, is_remote

WRITABLE_SCHEMES = ("s3://", "gs://", "gcs://")
UPLOADS_AHEAD = 4  # finished shards waiting for their upload, at most


class Publisher(Protocol):
    location: str  # OUT as the user named it
    local_out: Path  # where the build writes shards and its journal

    def finished_build(self, options, fingerprint: str, overwrite: bool) -> dict | None: ...
    def uploading(self) -> contextlib.AbstractContextManager: ...  # publish_shard's work is done at its end
    def publish_shard(self, path: Path, then: Callable[[], None]) -> None: ...  # then(): once it is published
    def after_published(self, then: Callable[[], None]) -> None: ...  # then(): once all before it are
    def remove_stale_shards(self, manifest: dict) -> None: ...
    def publish_manifest(self, manifest: dict) -> None: ...
    def done(self) -> None: ...


def publisher_for(out: Path | str) -> Publisher:
    if not is_remote(out):
        return LocalOut(Path(out))
    if not str(out).lower().startswith(WRITABLE_SCHEMES):
        raise UserError(f"{out}: shards build writes to a folder, s3:// or gs://; HTTP has no upload to write to")
    return RemoteOut(str(out))


def staging_folder(url: str) -> Path:
    name = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"shards-build-staging-{os.getuid()}" / name


def _rebuild_or_keep(existing: dict, options, fingerprint: str, shards_intact: bool, where: str) -> dict | None:
    """The earlier build's manifest when it is this very build, complete; None when it must be redone."""
    if existing["options"] != options.as_dict():
        raise UserError(
            f"{where} already holds shards built with other options; choose another OUT or pass --overwrite"
        )
    if shards_intact and existing.get("source", {}).get("fingerprint") == fingerprint:
        return existing
    shown = without_credentials(where)
    console.print(f"[yellow]{shown}: SRC changed or shards are missing since the last build; rebuilding[/]")
    return None


class LocalOut:
    def __init__(self, out: Path) -> None:
        self.location, self.local_out = str(out), out

    def finished_build(self, options, fingerprint: str, overwrite: bool) -> dict | None:
        path = self.local_out / MANIFEST_NAME
        if not path.exists():
            return None
        if not overwrite:
            existing = read_manifest(self.local_out)
            shards = [shard for split in SPLITS for shard in existing["splits"][split]["shards"]]
            intact = all(_has_size(self.local_out / shard["name"], shard.get("bytes")) for shard in shards)
            kept = _rebuild_or_keep(existing, options, fingerprint, intact, self.location)
            if kept is not None:
                return kept
        path.unlink()
        return None

    def uploading(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def publish_shard(self, path: Path, then: Callable[[], None]) -> None:
        then()  # renamed into place by its writer already

    def after_published(self, then: Callable[[], None]) -> None:
        then()

    def remove_stale_shards(self, manifest: dict) -> None:
        """Shards of an earlier, different build that the new manifest does not list."""
        listed = _listed(manifest)
        for path in self.local_out.iterdir():
            if SHARD_NAME.fullmatch(path.name) and path.name not in listed:
                path.unlink()

    def publish_manifest(self, manifest: dict) -> None:
        write_manifest(self.local_out, manifest)

    def done(self) -> None:
        pass


class RemoteOut:
    def __init__(self, url: str) -> None:
        self.remote = RemoteFolder(url)
        self.location, self.local_out = self.remote.url, staging_folder(self.remote.url)

    def finished_build(self, options, fingerprint: str, overwrite: bool) -> dict | None:
        folder = ShardFolder(None, self.remote)
        try:
            existing = folder.manifest()
        except StoreNotFound:
            return None
        if not overwrite:
            try:
                folder.check_shards(tuple(shard for split in SPLITS for shard in existing["splits"][split]["shards"]))
                intact = True
            except ManifestError:
                intact = False
            kept = _rebuild_or_keep(existing, options, fingerprint, intact, self.location)
            if kept is not None:
                return kept
        self.remote.delete(MANIFEST_NAME)  # first: no reader may trust it while the shards change
        return None

    @contextlib.contextmanager
    def uploading(self) -> Iterator[None]:
        """Uploads run in a thread of their own, in order, while the build goes on making shards; at most
        UPLOADS_AHEAD wait (the staging folder holds no more than that). The block ends when every upload
        has, and raises the first failure; after a failure nothing later is uploaded or journalled."""
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload")
        self._slots = threading.BoundedSemaphore(UPLOADS_AHEAD)
        self._failure: BaseException | None = None
        try:
            yield
        finally:
            self._uploads.shutdown(wait=True)
            if self._failure is not None:
                raise self._failure

    def publish_shard(self, path: Path, then: Callable[[], None]) -> None:
        def upload() -> None:
            self.remote.upload(path, path.name)
            path.unlink()
            then()

        self._slots.acquire()  # waits while UPLOADS_AHEAD shards are queued
        self._uploads.submit(self._in_order, upload)

    def after_published(self, then: Callable[[], None]) -> None:
        self._slots.acquire()
        self._uploads.submit(self._in_order, then)

    def _in_order(self, work: Callable[[], None]) -> None:
        try:
            if self._failure is None:
                work()
        except BaseException as error:
            self._failure = error
        finally:
            self._slots.release()

    def remove_stale_shards(self, manifest: dict) -> None:
        listed = _listed(manifest)
        for name in self.remote.names():
            if SHARD_NAME.fullmatch(name) and name not in listed:
                self.remote.delete(name)

    def publish_manifest(self, manifest: dict) -> None:
        self.remote.write_bytes(MANIFEST_NAME, manifest_bytes(manifest))

    def done(self) -> None:
        shutil.rmtree(self.local_out, ignore_errors=True)


def _listed(manifest: dict) -> set[str]:
    return {shard["name"] for split in SPLITS for shard in manifest["splits"][split]["shards"]}


def _has_size(path: Path, size: int | None) -> bool:
    return path.is_file() and (size is None or path.stat().st_size == size)
