"""What a store's failure means: the errors a remote folder raises, and whether a failure is worth retrying
(the store or the network may answer next time) or is a one-line error at once, naming what to check."""

from __future__ import annotations

import socket

from shards.errors import UserError


class StoreError(UserError):
    """A remote folder refused a request for good (not found, forbidden, no such host)."""


class StoreNotFound(StoreError):
    """The file is not in the remote folder (404, NoSuchKey)."""


class StoreUnavailable(UserError):
    """A remote folder kept failing for longer than the retry budget."""


class StoreMisbehaved(StoreError):
    """The store answered what no honest store does (more bytes than asked, a redirect elsewhere)."""


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
    if isinstance(error, TimeoutError):
        return "no answer within data.read_timeout"
    if status is not None:
        return f"HTTP {status} {getattr(error, 'message', '')}".rstrip()
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else 'no detail'}"
