"""Shard folders in object storage or behind HTTP: `s3://`, `gs://`, `http(s)://`, through fsspec.

A `RemoteFolder` reads and writes the files of one remote folder by name. Every request goes through
`retrying`: a transient failure (HTTP 5xx or 429, a dropped or refused connection, a timeout) is
retried with exponential backoff and full jitter until the folder's retry budget is spent; a permanent
one (404, 403, bad credentials, a host that does not resolve) is a one-line `StoreError` at once,
naming the URL and what to check. Credentials are never ours to store: fsspec's backends read them the
way each store's own tools do (AWS_* variables and profiles, gcloud's), and `storage_options` carries
the rest (an S3-compatible store's `endpoint_url`, say).

The fsspec file system is made lazily in each process: DataLoader workers fork after the dataset is
built, and an async HTTP session must not cross a fork.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from shards.errors import UserError, without_credentials

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "http://", "https://")
EXTRA_OF_SCHEME = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}  # pip install '.[s3]' ...
LOCAL_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
CHUNK = 8 * 2**20  # one ranged read; a dropped connection costs at most this much again
DEFAULT_RETRY_SECONDS = 120.0
FIRST_DELAY, MAX_DELAY = 0.25, 15.0  # seconds: the backoff's first and largest step (before jitter)

# this process's fetch counters, read and reset by whoever reports them (the trainer's log)
counters: Counter[str] = Counter()
FETCH_COUNTS = ("fetched_bytes", "fetched_shards", "fetch_retries", "evicted_shards")
# a forked DataLoader worker starts counting from zero: its parent's counts are its parent's to report
os.register_at_fork(after_in_child=counters.clear)

T = TypeVar("T")


@dataclass(frozen=True)
class RemoteAccess:
    """How to reach a remote shard folder (the run config's data.* keys of the same names)."""

    storage_options: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None  # None: shard_cache.default_cache_dir()
    cache_limit: int | None = None  # bytes; None: no limit but the disk
    retry_seconds: float = DEFAULT_RETRY_SECONDS


class StoreError(UserError):
    """A remote folder refused a request for good (not found, forbidden, no such host)."""


class StoreNotFound(StoreError):
    """The file is not in the remote folder (404, NoSuchKey)."""


class StoreUnavailable(UserError):
    """A remote folder kept failing for longer than the retry budget."""


def is_remote(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and location.lower().startswith(REMOTE_SCHEMES)


def take_counters() -> dict[str, int]:
    """This process's counters since the last call (bytes fetched, shards fetched, retries)."""
    taken = dict(counters)
    counters.clear()
    return taken


def http_status(error: BaseException) -> int | None:
    status = getattr(error, "status", None) or getattr(error, "code", None)
    return status if isinstance(status, int) else None


def underlying(error: BaseException) -> BaseException:
    """fsspec's HTTP file system reports any failure to reach a file's size as FileNotFoundError, the
    real failure (a refused connection, a 404) as its cause."""
    while isinstance(error, FileNotFoundError) and error.__cause__ is not None:
        error = error.__cause__
    return error


def does_not_resolve(error: BaseException) -> bool:
    # aiohttp wraps the resolver's gaierror in its own error; its message keeps the resolver's words
    return isinstance(error, socket.gaierror) or "Name or service not known" in str(error)


def is_transient(error: BaseException) -> bool:
    """Worth retrying: the store or the network may answer next time."""
    error = underlying(error)
    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    status = http_status(error)
    if status is not None:
        return status == 429 or status >= 500 or status == 408
    if does_not_resolve(error):
        return False  # a typo in the URL, not an outage
    return isinstance(error, OSError | TimeoutError | ConnectionError) or type(error).__module__.startswith(
        ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests")
    )


def is_not_found(error: BaseException) -> bool:
    error = underlying(error)
    return isinstance(error, FileNotFoundError) or http_status(error) == 404


def what_to_check(error: BaseException) -> str:
    error = underlying(error)
    status = http_status(error)
    if is_not_found(error):
        return "not found: check the URL (is the folder built and uploaded?)"
    if isinstance(error, PermissionError) or status in (401, 403):
        return "access denied: check the credentials (AWS_* variables or profile, gcloud) and the bucket's policy"
    if does_not_resolve(error):
        return "the host does not resolve: check the URL or data.storage_options' endpoint_url"
    if status is not None:
        return f"HTTP {status} {getattr(error, 'message', '')}".rstrip()
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else 'no detail'}"


def retrying(call: Callable[[], T], url: str, budget: float) -> T:
    """call(), retried on transient failures with exponential backoff and full jitter for up to `budget`
    seconds. Full jitter: many ranks and workers that failed together must not retry together. A full
    local disk (writing what was read) is raised as it is: the caller's to report, not the store's."""
    deadline = time.monotonic() + budget
    attempt = 0
    while True:
        try:
            return call()
        except Exception as error:
            if isinstance(error, OSError) and error.errno in LOCAL_DISK_ERRORS:
                raise
            if not is_transient(error):
                refusal = StoreNotFound if is_not_found(error) else StoreError
                raise refusal(f"{url}: {what_to_check(error)}") from None
            delay = random.uniform(0, min(MAX_DELAY, FIRST_DELAY * 2**attempt))
            if time.monotonic() + delay > deadline:
                raise StoreUnavailable(
                    f"{url}: the store kept failing for {budget:.0f} s ({what_to_check(error)}); the run can be "
                    "resumed once it answers again (data.retry_seconds sets the budget)"
                ) from None
            attempt += 1
            counters["fetch_retries"] += 1
            line = f"warning: {url}: {what_to_check(error)}; retry {attempt} in {delay:.1f} s"
            print(without_credentials(line), file=sys.stderr, flush=True)
            time.sleep(delay)


class RemoteFolder:
    """The files of one remote folder, by name."""

    def __init__(
        self, url: str, storage_options: dict[str, Any] | None = None, retry_seconds: float = DEFAULT_RETRY_SECONDS
    ) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.retry_seconds = retry_seconds
        self._fs, self._root, self._pid = None, "", -1

    def __getstate__(self) -> dict:  # spawned DataLoader workers get the address, never the session
        return {**self.__dict__, "_fs": None, "_pid": -1}

    @property
    def fs(self):
        if self._pid != os.getpid():
            self._fs, self._root = file_system(self.url, self.storage_options)
            self._pid = os.getpid()
        return self._fs

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def path_of(self, name: str) -> str:
        self.fs  # noqa: B018 - sets _root in this process
        return f"{self._root.rstrip('/')}/{name}"

    def retrying(self, call: Callable[[], T], name: str) -> T:
        return retrying(call, self.url_of(name), self.retry_seconds)

    def read_bytes(self, name: str) -> bytes:
        return self.retrying(lambda: self.fs.cat_file(self.path_of(name)), name)

    def size(self, name: str) -> int:
        return int(self.retrying(lambda: self.fs.info(self.path_of(name))["size"], name))

    def download(self, name: str, size: int, into: BinaryIO) -> str:
        """Write the file's `size` bytes into `into`; returns their sha256. A failure mid-file resumes at
        the byte reached (ranged reads), within the retry budget."""
        digest, done = hashlib.sha256(), 0

        def read_rest() -> None:
            nonlocal done
            known_size = {"size": size} if "http" in self.fs.protocol else {}  # no HEAD request for it
            with self.fs.open(self.path_of(name), "rb", block_size=CHUNK, cache_type="none", **known_size) as source:
                source.seek(done)
                while done < size:
                    chunk = source.read(min(CHUNK, size - done))
                    if not chunk:
                        break
                    into.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    counters["fetched_bytes"] += len(chunk)

        self.retrying(read_rest, name)
        return digest.hexdigest() if done == size else ""

    def upload(self, local: Path, name: str) -> None:
        """Put a finished local file under `name`. Object stores make it visible whole or not at all."""
        self.retrying(lambda: self.fs.put_file(str(local), self.path_of(name)), name)

    def write_bytes(self, name: str, data: bytes) -> None:
        self.retrying(lambda: self.fs.pipe_file(self.path_of(name), data), name)

    def delete(self, name: str) -> None:
        with contextlib.suppress(StoreNotFound):
            self.retrying(lambda: self.fs.rm_file(self.path_of(name)), name)

    def names(self) -> list[str]:
        """The names of the files directly in the folder ([] when there is none yet)."""
        self.fs.invalidate_cache()  # s3fs caches listings: this one must be of the store as it is now
        try:
            found = self.retrying(lambda: self.fs.ls(self.path_of("").rstrip("/"), detail=False), "")
        except StoreNotFound:
            return []
        return [path.rstrip("/").rsplit("/", 1)[-1] for path in found]


def file_system(url: str, storage_options: dict[str, Any], shared: bool = False):
    """fsspec's file system for `url` and the path in it; a missing extra is one line. `shared`: fsspec's
    instance for these options in this process (one session for many small reads), else a new one."""
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(url, skip_instance_cache=not shared, **storage_options)
    except ImportError as error:
        scheme = url.split("://", 1)[0].lower()
        extra = EXTRA_OF_SCHEME.get(scheme)
        hint = f"pip install 'vaegan-pipeline[{extra}]'" if extra else f"install fsspec's support for {scheme}://"
        raise StoreError(f"{url}: {scheme}:// needs a package that is not installed ({error.name}): {hint}") from None
    except (TypeError, ValueError) as error:
        raise StoreError(f"{url}: data.storage_options not accepted: {error}") from None
