"""The node-local cache of remote shards: each shard fetched once per node, checked, then read locally.

Every rank and DataLoader worker of a node shares one folder (data.cache_dir). A shard is stored by its
manifest sha256 (`SHA.tar`: the same bytes under two URLs are one file, and a rebuilt shard is never
mistaken for the old one). Who fetches it holds `SHA.lock` (flock), so the others wait and then find it
there (the lock files stay, empty, in .locks/: removing one could let two processes hold "the" lock); it
is written under a temporary name, its sha256 compared with the manifest's, and only then
renamed into place: no process ever reads a partial or wrong shard.

Eviction (data.cache_limit): least recently used first (a shard's mtime is touched each time it is
opened), never a shard in use: a reader holds a shared flock on its open file, and the evictor only
removes a file whose exclusive flock it can take without waiting.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from shards.errors import UserError, without_credentials
from shards.remote import LOCAL_DISK_ERRORS, RemoteFolder, counters


class CacheFull(UserError):
    """The cache's disk cannot take the next shard."""


class DamagedShard(UserError):
    """A shard whose downloaded bytes twice did not match the manifest."""


def default_cache_dir() -> Path:
    """Per user, under the system's temporary folder: the same for every rank of a node."""
    return Path(tempfile.gettempdir()) / f"vaegan-shard-cache-{os.getuid()}"


# Lock files this process holds. A flock belongs to the open file, which fork() shares: a DataLoader worker
# forked while another thread of its rank held a lock would hold it too, for ever (and wait on itself).
# So a child closes its copies at once; the parent's lock is untouched.
_held: set[BinaryIO] = set()


def _close_held_copies() -> None:
    for file in _held:
        file.close()
    _held.clear()


os.register_at_fork(after_in_child=_close_held_copies)


@contextlib.contextmanager
def flocked(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[None]:
    with open(path, "a+b") as file:
        _held.add(file)
        try:
            fcntl.flock(file, mode)  # released by the kernel when the holder dies, whatever the way
            yield
        finally:
            _held.discard(file)


class ShardCache:
    def __init__(self, folder: Path | None = None, limit: int | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.limit = limit
        try:
            (self.folder / ".locks").mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise CacheFull(f"data.cache_dir {self.folder}: cannot create it ({error.strerror})") from None

    def path_of(self, record: dict) -> Path:
        return self.folder / f"{record['sha256']}.tar"

    def open(self, remote: RemoteFolder, record: dict) -> BinaryIO:
        """The cached shard, opened and held in use (shared flock) until the file is closed."""
        while True:
            path = self.fetch(remote, record)
            try:
                file = open(path, "rb")  # noqa: SIM115 - returned open: the lock lives as long as the file
            except FileNotFoundError:  # evicted between the two lines: fetch it again
                continue
            fcntl.flock(file, fcntl.LOCK_SH)
            if os.fstat(file.fileno()).st_nlink:  # not evicted between open and lock
                return file
            file.close()

    def fetch(self, remote: RemoteFolder, record: dict) -> Path:
        """The shard's path in the cache, fetched first if it is not there (once per node)."""
        target = self.path_of(record)
        if not target.exists():
            with flocked(self.folder / ".locks" / f"{record['sha256']}.lock"):
                if not target.exists():
                    self._download(remote, record, target)
        with contextlib.suppress(FileNotFoundError):
            os.utime(target)  # most recently used
        return target

    def _download(self, remote: RemoteFolder, record: dict, target: Path) -> None:
        name, size = record["name"], record["bytes"]
        for attempt in (1, 2):
            self.make_room(size)
            temp = target.with_name(f".{target.name}.{os.getpid()}.part")
            try:
                with open(temp, "wb") as file:
                    digest = remote.download(name, size, file)
                if digest == record["sha256"]:
                    os.replace(temp, target)
                    counters["fetched_shards"] += 1
                    return
            except OSError as error:
                if error.errno in LOCAL_DISK_ERRORS:
                    raise CacheFull(
                        f"the shard cache's disk is full: {self.folder} cannot take {name} ({size} bytes, "
                        f"{shutil.disk_usage(self.folder).free} free): free space there, or set data.cache_dir "
                        "to a larger disk (data.cache_limit bounds what the cache keeps)"
                    ) from None
                raise
            finally:
                temp.unlink(missing_ok=True)
            if attempt == 1:
                print(
                    without_credentials(
                        f"warning: {remote.url_of(name)}: the bytes fetched do not match the manifest's sha256; "
                        "fetching it again"
                    ),
                    file=sys.stderr,
                    flush=True,
                )
        raise DamagedShard(f"{remote.url_of(name)}: fetched twice, its bytes do not match the manifest's sha256")

    def make_room(self, incoming: int) -> None:
        """Evict least recently used shards not in use until `incoming` more bytes fit in the limit."""
        if self.limit is None:
            return
        with flocked(self.folder / ".evict.lock"):
            cached = []
            for path in self.folder.glob("*.tar"):
                with contextlib.suppress(FileNotFoundError):
                    status = path.stat()
                    cached.append((status.st_mtime_ns, status.st_size, path))
            total = sum(size for _, size, _ in cached)
            for _, size, path in sorted(cached):
                if total + incoming <= self.limit:
                    return
                if evict(path):
                    total -= size
                    counters["evicted_shards"] += 1


def evict(path: Path) -> bool:
    """Remove a cached shard unless some process has it open (holds its shared flock)."""
    try:
        with open(path, "rb") as file:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()
            return True
    except (BlockingIOError, FileNotFoundError):
        return False
