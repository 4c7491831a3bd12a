"""The node-local cache of remote shards: each shard fetched once per node, checked, then read locally.

Every rank and DataLoader worker of a node shares one folder (data.cache_dir). A shard is stored by its
manifest sha256 (`SHA.tar`: the same bytes under two URLs are one file, and a rebuilt shard is never
mistaken for the old one). Who fetches it holds `SHA.lock` (flock), so the others wait and then find it
there (the lock files stay, empty, in .locks/: removing one could let two processes hold "the" lock); it
is written under a temporary name, its sha256 compared with the manifest's, and only then
renamed into place: no process ever reads a partial or wrong shard.

A cached copy is checked again each time it is opened, since anything may have changed it on disk since
(a copy made over it, a truncation, a restore): its size against the manifest's, and its identity (device,
inode, size, mtime and ctime, which no tool can set back) against the one recorded in `SHA.id` when it
was fetched or last checked. A copy whose identity is not the recorded one is hashed whole (sha256) and,
if it is not the manifest's shard, removed and fetched again; otherwise its identity is recorded anew.
Hashing at every open would cost a data worker about 3 % of its decode time per worker sharing the shard
(docs/benchmarks.md, "Checking a cached shard"): the identity makes the common case free. `.part` files
of a fetch whose process died are removed by the next fetch of that shard, or when a cache is opened.

Eviction (data.cache_limit): least recently used first (`SHA.id`'s mtime is touched each time the shard
is opened: touching the shard itself would change its identity), never a shard in use: a reader holds a
shared flock on its open file, and the evictor only removes a file whose exclusive flock it can take
without waiting. Fetches in flight (their `.part` files) count against the limit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from shards.errors import UserError, without_credentials
from shards.regular_files import open_regular, stream_sha256
from shards.store.remote import LOCAL_DISK_ERRORS, RemoteFolder, counters

IDENTITY = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")
REOPENS = 3  # a cached copy found changed this many times in a row: something keeps changing it


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
# Opening a lock file and registering it (and unregistering and closing it) happen under this lock, which
# fork() takes first: a fork between the two would give the child a copy no one closes.
_registry = threading.Lock()


def _close_held_copies() -> None:
    for file in _held:
        file.close()
    _held.clear()
    _registry.release()


os.register_at_fork(before=_registry.acquire, after_in_parent=_registry.release, after_in_child=_close_held_copies)


@contextlib.contextmanager
def flocked(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[None]:
    with _registry:
        file = open(path, "a+b")  # noqa: SIM115 - closed below, under the registry lock
        _held.add(file)
    try:
        fcntl.flock(file, mode)  # released by the kernel when the holder dies, whatever the way
        yield
    finally:
        with _registry:
            _held.discard(file)
            file.close()


def identity(status: os.stat_result) -> list[int]:
    return [getattr(status, name) for name in IDENTITY]


def identity_file(shard: Path) -> Path:
    """`SHA.id` beside `SHA.tar`: the cached copy's identity as last checked, and its last use (mtime)."""
    return shard.with_suffix(".id")


class ShardCache:
    def __init__(self, folder: Path | None = None, limit: int | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.limit = limit
        try:
            (self.folder / ".locks").mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise CacheFull(f"data.cache_dir {self.folder}: cannot create it ({error.strerror})") from None
        self.drop_dead_parts()

    def path_of(self, record: dict) -> Path:
        return self.folder / f"{record['sha256']}.tar"

    def identity_path(self, record: dict) -> Path:
        return identity_file(self.path_of(record))

    def lock_of(self, sha256: str) -> Path:
        return self.folder / ".locks" / f"{sha256}.lock"

    def open(self, remote: RemoteFolder, record: dict) -> BinaryIO:
        """The cached shard, checked to be the manifest's (see the module's docstring), opened and held in
        use (shared flock) until the file is closed."""
        changed = 0  # copies found changed; an eviction between the steps below costs a fetch, not a try
        while changed < REOPENS:
            path = self.fetch(remote, record)
            try:
                file = open(path, "rb")  # noqa: SIM115 - returned open: the lock lives as long as the file
            except FileNotFoundError:  # evicted between the two lines: fetch it again
                continue
            fcntl.flock(file, fcntl.LOCK_SH)
            status = os.fstat(file.fileno())
            if not status.st_nlink:  # evicted between open and lock
                file.close()
                continue
            if self.is_the_shard(file, status, record):
                return file
            file.close()
            changed += 1
            self.discard(path, status, record)
            print(
                f"warning: {path}: the cached copy of {remote.url_of(record['name'])} is not the shard the "
                "manifest names (changed on disk since it was fetched); fetching it again",
                file=sys.stderr,
                flush=True,
            )
        raise DamagedShard(
            f"{self.path_of(record)}: the cached copy of {remote.url_of(record['name'])} keeps changing on disk "
            "after it is fetched: is another program writing into data.cache_dir?"
        )

    def is_the_shard(self, file: BinaryIO, status: os.stat_result, record: dict) -> bool:
        """The open copy is the manifest's shard: its size, and its identity as recorded, else its sha256
        (then recorded as known)."""
        if status.st_size != record["bytes"]:
            return False
        if self.recorded_identity(record) == identity(status):
            return True
        digest = stream_sha256(file)
        file.seek(0)
        if digest != record["sha256"]:
            return False
        self.record_identity(record, status)
        return True

    def recorded_identity(self, record: dict) -> list[int] | None:
        try:
            with open_regular(self.identity_path(record)) as file:  # never blocks, whatever is there
                return json.loads(file.read(4096))
        except (OSError, ValueError):
            return None

    def record_identity(self, record: dict, status: os.stat_result) -> None:
        path = self.identity_path(record)
        temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        temp.write_text(json.dumps(identity(status)))
        with contextlib.suppress(FileNotFoundError):  # swept meanwhile: the next open checks it in full
            os.replace(temp, path)

    def discard(self, path: Path, status: os.stat_result, record: dict) -> None:
        """Remove the cached copy found wrong, unless another process has replaced it meanwhile."""
        with flocked(self.lock_of(record["sha256"])), contextlib.suppress(FileNotFoundError):
            now = path.stat()
            if (now.st_dev, now.st_ino) == (status.st_dev, status.st_ino):
                path.unlink()
                self.identity_path(record).unlink(missing_ok=True)

    def holds(self, record: dict) -> bool:
        """A copy of the manifest's size is there (the cheap check; `open` checks the rest)."""
        try:
            return self.path_of(record).stat().st_size == record["bytes"]
        except FileNotFoundError:
            return False

    def fetch(self, remote: RemoteFolder, record: dict) -> Path:
        """The shard's path in the cache, fetched first if no copy of its size is there (once per node)."""
        target = self.path_of(record)
        if not self.holds(record):
            with flocked(self.lock_of(record["sha256"])):
                if not self.holds(record):
                    self.drop_parts(record["sha256"])  # we hold the lock: no fetch of it is alive
                    target.unlink(missing_ok=True)  # a copy cut short
                    self._download(remote, record, target)
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.identity_path(record))  # most recently used
        return target

    def drop_parts(self, sha256: str) -> None:
        for part in self.folder.glob(f".{sha256}.tar.*.part"):
            part.unlink(missing_ok=True)

    def drop_dead_parts(self) -> None:
        """`.part` files whose fetch is no longer alive (its process was killed): their shard's lock is free;
        and identity records half written (losing one only costs a full check)."""
        for part in self.folder.glob(".*.id.*.part"):
            part.unlink(missing_ok=True)
        for part in self.folder.glob(".*.tar.*.part"):
            sha256 = part.name[1:].split(".", 1)[0]
            with contextlib.suppress(OSError), open(self.lock_of(sha256), "a+b") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being fetched now
                part.unlink(missing_ok=True)

    def _download(self, remote: RemoteFolder, record: dict, target: Path) -> None:
        name, size = record["name"], record["bytes"]
        for attempt in (1, 2):
            self.make_room(size)
            temp = target.with_name(f".{target.name}.{os.getpid()}.part")
            try:
                with open(temp, "wb") as file:
                    file.truncate(size)  # its full size at once (sparse): make_room counts fetches in flight whole
                    digest = remote.download(name, size, file)
                if digest == record["sha256"]:
                    os.replace(temp, target)
                    self.record_identity(record, target.stat())
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
        """Evict least recently used shards not in use until `incoming` more bytes fit in the limit, the
        fetches in flight counted."""
        if self.limit is None:
            return
        with flocked(self.folder / ".evict.lock"):
            cached, in_flight = [], 0
            for path in self.folder.glob("*.tar"):
                with contextlib.suppress(FileNotFoundError):
                    size = path.stat().st_size
                    used = self.last_used(path)
                    cached.append((used, size, path))
            for part in self.folder.glob(".*.part"):
                with contextlib.suppress(FileNotFoundError):
                    in_flight += part.stat().st_size
            total = in_flight + sum(size for _, size, _ in cached)
            for _, size, path in sorted(cached):
                if total + incoming <= self.limit:
                    return
                if evict(path):
                    total -= size
                    counters["evicted_shards"] += 1

    @staticmethod
    def last_used(path: Path) -> int:
        try:
            return identity_file(path).stat().st_mtime_ns
        except FileNotFoundError:
            return path.stat().st_mtime_ns


def evict(path: Path) -> bool:
    """Remove a cached shard unless some process has it open (holds its shared flock)."""
    try:
        with open(path, "rb") as file:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()
            identity_file(path).unlink(missing_ok=True)
            return True
    except (BlockingIOError, FileNotFoundError):
        return False
