"""SRC wherever it is: the listing of its images and the bytes of one, from a local folder or list file
(sources.py) or from object storage or HTTP (remote_sources.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from shards.build.remote_sources import list_remote_sources, read_remote_image
from shards.build.sources import Fingerprint, Listing, SkipImage, scan_local_sources
from shards.store.remote import is_remote

MAX_FILE_BYTES = 512 * 2**20  # read before decoding: a larger "image" is not one we want in memory


def list_sources(src: Path | str, labels_from_folders: bool = False, exclude: Path | None = None) -> Listing:
    """exclude: a folder under SRC to leave out (OUT, when it lies inside SRC). SRC may be remote
    (shards/remote_sources.py)."""
    if is_remote(src):
        listing = list_remote_sources(str(src), labels_from_folders)
    else:
        rejected: list[tuple[str, str]] = []
        fingerprint = Fingerprint()
        entries = [fingerprint.add(entry) for entry in scan_local_sources(src, labels_from_folders, exclude, rejected)]
        listing = Listing(entries, rejected, fingerprint.hexdigest())
    listing.entries.sort(key=lambda entry: entry.relpath)
    listing.rejected.sort()
    return listing


def read_source(path: str | Path) -> bytes:
    if isinstance(path, str) and "://" in path:
        return read_remote_image(path)
    try:
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode):
            raise SkipImage("not a regular file")
        if status.st_size > MAX_FILE_BYTES:
            raise SkipImage(f"file too large ({status.st_size:,} bytes)")
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SkipImage("file not found") from None
    except IsADirectoryError:
        raise SkipImage("unreadable: is a directory") from None
    except OSError as error:
        raise SkipImage(f"unreadable: {error.strerror or error}") from None
    if not data:
        raise SkipImage("empty file")
    return data
