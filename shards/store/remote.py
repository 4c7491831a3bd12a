"""Shard folders in object storage or behind HTTP: `s3://`, `gs://`, `http(s)://`, through fsspec.

A `RemoteFolder` reads and writes the files of one remote folder by name. Every request goes through
`retrying`: a transient failure (HTTP 5xx or 429, a dropped or refused connection, a timeout) is
retried with exponential backoff and full jitter until the folder's retry budget is spent; a permanent
one (404, 403, bad credentials, a host that does not resolve) is a one-line `StoreError` at once,
naming the URL and what to check.

Every wait is bounded, whatever the store does: each request, and each ranged read of up to CHUNK
bytes, must finish within `read_timeout` seconds (a store that answers and then trickles times out like
one that does not answer, and is retried from the byte reached); a transfer that makes progress starts
its retry budget again. Nothing a store sends can grow without bound: files are read in ranged pieces
of the size asked, HTTP bodies are never decompressed (`Accept-Encoding: identity`; a gzip bomb stays
its size on the wire, and its bytes fail the manifest's sha256), an answer longer than the range asked
is refused, and a manifest or record file may weigh at most MAX_RECORD_FILE_BYTES. An HTTP redirect is
followed only within the same origin (scheme, host and port) unless `redirects="any"`: the folder a
user names is the one read. Credentials are never ours to store: fsspec's backends read them the
way each store's own tools do (AWS_* variables and profiles, gcloud's), and `storage_options` carries
the rest (an S3-compatible store's `endpoint_url`, say).

The fsspec file system is made lazily in each process: DataLoader workers fork after the dataset is
built, and an async HTTP session must not cross a fork.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from shards.errors import without_credentials
from shards.store.failures import (
    StoreError,
    StoreMisbehaved,
    StoreNotFound,
    StoreUnavailable,
    is_not_found,
    is_transient,
    underlying,
    what_to_check,
)
from shards.store.http import http_options, http_range

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "http://", "https://")
EXTRA_OF_SCHEME = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}  # pip install '.[s3]' ...
LOCAL_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
CHUNK = 8 * 2**20  # one ranged read; a dropped connection costs at most this much again
DEFAULT_RETRY_SECONDS = 120.0
DEFAULT_READ_TIMEOUT = 60.0  # seconds for one request or one CHUNK: a store slower than ~140 KB/s times out
MAX_RECORD_FILE_BYTES = 256 * 2**20  # a manifest (about 1.5 million shards), a plan or a part's record
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
    read_timeout: float = DEFAULT_READ_TIMEOUT
    redirects: str = "same-origin"

    def folder(self, url: str) -> RemoteFolder:
        return RemoteFolder(url, self.storage_options, self.retry_seconds, self.read_timeout, self.redirects)


def is_remote(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and location.lower().startswith(REMOTE_SCHEMES)


def take_counters() -> dict[str, int]:
    """This process's counters since the last call (bytes fetched, shards fetched, retries)."""
    taken = dict(counters)
    counters.clear()
    return taken


def retrying(call: Callable[[], T], url: str, budget: float, progress: Callable[[], int] | None = None) -> T:
    """call(), retried on transient failures with exponential backoff and full jitter for up to `budget`
    seconds. Full jitter: many ranks and workers that failed together must not retry together. A full
    local disk (writing what was read) is raised as it is: the caller's to report, not the store's; so is
    a StoreError the call raised itself. `progress` (bytes transferred so far): a failure after progress
    starts the budget and the backoff again, so that a long transfer on a flaky link is not cut short by
    failures spread over hours."""
    deadline = time.monotonic() + budget
    attempt = 0
    reached = progress() if progress else 0
    while True:
        try:
            return call()
        except Exception as error:
            if isinstance(error, OSError) and error.errno in LOCAL_DISK_ERRORS:
                raise
            if isinstance(underlying(error), StoreError):  # ours, raised inside fsspec's call
                raise underlying(error) from None
            if progress is not None and progress() > reached:
                reached, attempt, deadline = progress(), 0, time.monotonic() + budget
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
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        redirects: str = "same-origin",
    ) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.retry_seconds, self.read_timeout, self.redirects = retry_seconds, read_timeout, redirects
        self._fs, self._root, self._pid = None, "", -1

    def __getstate__(self) -> dict:  # spawned DataLoader workers get the address, never the session
        return {**self.__dict__, "_fs": None, "_pid": -1}

    @property
    def fs(self):
        if self._pid != os.getpid():
            self._fs, self._root = file_system(self.url, self.storage_options, redirects=self.redirects)
            self._pid = os.getpid()
        return self._fs

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def path_of(self, name: str) -> str:
        self.fs  # noqa: B018 - sets _root in this process
        return f"{self._root.rstrip('/')}/{name}"

    def retrying(self, call: Callable[[], T], name: str, progress: Callable[[], int] | None = None) -> T:
        return retrying(call, self.url_of(name), self.retry_seconds, progress)

    def _bounded(self, method: str, *args, timeout: float | None = None, **kwargs):
        """fsspec's `method` on the folder's file system, bounded by `timeout` (see `_on_loop`)."""
        fs = self.fs
        if not getattr(fs, "async_impl", False):  # every store of REMOTE_SCHEMES is async; others are not bounded
            return getattr(fs, method)(*args, **kwargs)
        return self._on_loop(getattr(fs, f"_{method}"), *args, timeout=timeout, **kwargs)

    def _on_loop(self, coroutine: Callable, *args, timeout: float | None = None, **kwargs):
        """`coroutine(*args, **kwargs)` run on fsspec's loop, given `timeout` seconds (read_timeout by
        default) to finish, cancelled when the time is up (FSTimeoutError, a TimeoutError: transient)."""
        from fsspec.asyn import sync

        return sync(self.fs.loop, coroutine, *args, timeout=timeout or self.read_timeout, **kwargs)

    def read_range(self, name: str, start: int, end: int, timeout: float | None = None) -> bytes:
        """Bytes [start, end) of the file (fewer at its end), in one request bounded by `timeout`
        (read_timeout); an answer longer than asked is refused (StoreMisbehaved)."""
        path = self.path_of(name)
        if "http" in self.fs.protocol:
            data = self._on_loop(http_range, self.fs, path, start, end, timeout=timeout)
        else:
            data = self._bounded("cat_file", path, start=start, end=end, timeout=timeout)
        if len(data) > end - start:
            raise StoreMisbehaved(f"{self.url_of(name)}: answered {len(data)} bytes for a range of {end - start}")
        return data

    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        """A small file (a manifest, a plan, a record) whole: at most `limit` bytes (MAX_RECORD_FILE_BYTES),
        else StoreMisbehaved before a byte of it is read."""
        limit = MAX_RECORD_FILE_BYTES if limit is None else limit
        size = self.size(name)
        if size is not None and size > limit:
            raise StoreMisbehaved(
                f"{self.url_of(name)}: {size} bytes, more than the {limit} bytes such a file may weigh"
            )
        into = io.BytesIO()  # no size given (no Content-Length): up to the limit, and one byte more to know
        read = self.download(name, limit + 1 if size is None else size, into, digest=False)
        if read > limit:
            raise StoreMisbehaved(f"{self.url_of(name)}: more than the {limit} bytes such a file may weigh")
        if size is not None and read != size:
            raise StoreError(f"{self.url_of(name)}: shorter than the {size} bytes the store says it holds")
        return into.getvalue()

    def size(self, name: str) -> int | None:
        """The file's size in bytes; None when the store does not say (HTTP without Content-Length)."""
        size = self.retrying(lambda: self._bounded("info", self.path_of(name))["size"], name)
        return None if size is None else int(size)

    def download(self, name: str, size: int, into: BinaryIO, digest: bool = True) -> int | str:
        """Write the file's first `size` bytes into `into`, in ranged reads of CHUNK bytes; a failure
        mid-file resumes at the byte reached, within the retry budget (which progress renews). Returns the
        sha256 of the bytes when `size` were read ("" when the file was shorter), or with digest=False the
        number read."""
        hasher, done = hashlib.sha256(), 0

        def read_rest() -> None:
            nonlocal done
            while done < size:
                # each CHUNK of the file within read_timeout, however many short answers it takes: a store
                # that answers a few bytes at a time is as bounded as one that trickles
                end, deadline = min(size, done + CHUNK), time.monotonic() + self.read_timeout
                while done < end:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"{CHUNK} bytes not read within data.read_timeout")
                    chunk = self.read_range(name, done, end, timeout=left)
                    if not chunk:
                        return
                    into.write(chunk)
                    hasher.update(chunk)
                    done += len(chunk)
                    counters["fetched_bytes"] += len(chunk)

        self.retrying(read_rest, name, progress=lambda: done)
        if not digest:
            return done
        return hasher.hexdigest() if done == size else ""

    def upload(self, local: Path, name: str) -> None:
        """Put a finished local file under `name`. Object stores make it visible whole or not at all. Its
        time bound: read_timeout for each CHUNK of it."""
        pieces = 1 + local.stat().st_size // CHUNK
        self.retrying(
            lambda: self._bounded("put_file", str(local), self.path_of(name), timeout=pieces * self.read_timeout),
            name,
        )

    def write_bytes(self, name: str, data: bytes) -> None:
        self.retrying(lambda: self._bounded("pipe_file", self.path_of(name), data), name)

    def delete(self, name: str) -> None:
        with contextlib.suppress(StoreNotFound):
            self.retrying(lambda: self._bounded("rm_file", self.path_of(name)), name)

    def names(self) -> list[str]:
        """The names of the files directly in the folder ([] when there is none yet)."""
        self.fs.invalidate_cache()  # s3fs caches listings: this one must be of the store as it is now
        try:
            found = self.retrying(lambda: self._bounded("ls", self.path_of("").rstrip("/"), detail=False), "")
        except StoreNotFound:
            return []
        return [path.rstrip("/").rsplit("/", 1)[-1] for path in found]


def file_system(url: str, storage_options: dict[str, Any], shared: bool = False, redirects: str = "same-origin"):
    """fsspec's file system for `url` and the path in it; a missing extra is one line. `shared`: fsspec's
    instance for these options in this process (one session for many small reads), else a new one. Over
    HTTP: bodies never decompressed, redirects as `redirects` says."""
    import fsspec.core

    options = dict(storage_options)
    if url.lower().startswith(("http://", "https://")):
        options = http_options(options, redirects)
    try:
        return fsspec.core.url_to_fs(url, skip_instance_cache=not shared, **options)
    except ImportError as error:
        scheme = url.split("://", 1)[0].lower()
        extra = EXTRA_OF_SCHEME.get(scheme)
        hint = f"pip install 'vaegan-pipeline[{extra}]'" if extra else f"install fsspec's support for {scheme}://"
        raise StoreError(f"{url}: {scheme}:// needs a package that is not installed ({error.name}): {hint}") from None
    except (TypeError, ValueError) as error:
        raise StoreError(f"{url}: data.storage_options not accepted: {error}") from None
