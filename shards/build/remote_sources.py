"""A remote SRC for `shards build`: every image under an s3:// or gs:// prefix, or a .txt/.csv list file
(itself local or remote) of image URLs.

Only paths, labels and the listing's own metadata are held (about 150 bytes an image, as for a local
folder); the workers read each image when they come to it, with the remote store's retries. The
fingerprint that tells a resumed build whether SRC changed comes from the listing alone (each object's
size and ETag from an s3:// or gs:// listing; for a list of URLs, the list): no request per image.
"""

from __future__ import annotations

import hashlib
import os
from urllib.parse import urlsplit

from shards.build.sources import LIST_SUFFIXES, Entry, Listing, SkipImage, SourceError, name_problem, parse_list_rows
from shards.store.failures import StoreError, StoreNotFound
from shards.store.remote import DEFAULT_RETRY_SECONDS, RemoteFolder, file_system, retrying

LISTABLE = ("s3://", "gs://", "gcs://")
MAX_REMOTE_IMAGE_BYTES = 2**31  # what read_remote_image refuses, as read_source does a local file over the limit


def is_list_file(url: str) -> bool:
    return os.path.splitext(urlsplit(url).path)[1].lower() in LIST_SUFFIXES


def list_remote_sources(src: str, labels_from_folders: bool) -> Listing:
    if is_list_file(src):
        if labels_from_folders:
            raise SourceError("--labels folder needs SRC to be a folder; a list file gives labels in a column")
        folder, name = src.rsplit("/", 1)
        try:
            text = RemoteFolder(folder).read_bytes(name).decode("utf-8-sig")
        except StoreNotFound:
            raise SourceError(f"SRC does not exist: {src}") from None
        except UnicodeDecodeError as error:
            raise SourceError(f"cannot read list file {src}: {error}") from None
        return list_of_urls(parse_list_rows(text, src.lower().endswith(".csv"), src), folder)
    if not src.lower().startswith(LISTABLE):
        raise SourceError(f"SRC {src}: an HTTP folder cannot be listed; give a .txt/.csv list of its image URLs")
    return list_prefix(src.rstrip("/"), labels_from_folders)


def list_of_urls(rows: list[list[str]], folder: str) -> Listing:
    """A list file's rows: absolute URLs as they are, relative paths under the list's own folder."""
    listing = Listing(entries=[])
    seen: set[str] = set()
    signature = hashlib.sha256()
    for row in rows:
        if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
            continue
        given = row[0].strip()
        label = row[1].strip() if len(row) > 1 and row[1].strip() else None
        if "://" not in given and (given.startswith("/") or ".." in given.split("/")):
            listing.rejected.append((given, "path leaves SRC ('..')"))
        elif given in seen:
            listing.rejected.append((given, "listed twice"))
        else:
            seen.add(given)
            url = given if "://" in given else f"{folder}/{given}"
            listing.entries.append(Entry(relpath=given, path=url, label=label))
            signature.update(f"{given}\0{label}\n".encode())
    listing.fingerprint = signature.hexdigest()
    return listing


def list_prefix(src: str, labels_from_folders: bool) -> Listing:
    remote = RemoteFolder(src)
    root = remote.path_of("").rstrip("/")
    found = retrying(lambda: remote.fs.find(root, detail=True), src, remote.retry_seconds)
    if not found:
        raise SourceError(f"SRC does not exist or is empty: {src}")
    listing = Listing(entries=[])
    signature = hashlib.sha256()
    scheme = src.split("://", 1)[0]
    for path in sorted(found):
        relpath = path[len(root) + 1 :]
        label = relpath.split("/", 1)[0] if labels_from_folders and "/" in relpath else None
        reason = name_problem(relpath)
        if reason is None and labels_from_folders and label is None:
            reason = "not inside a label folder (--labels folder)"
        if reason:
            listing.rejected.append((relpath, reason))
            continue
        listing.entries.append(Entry(relpath=relpath, path=f"{scheme}://{path}", label=label))
        info = found[path]
        version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
        signature.update(f"{relpath}\0{label}\0{info.get('size')}:{version}\n".encode())
    listing.fingerprint = signature.hexdigest()
    return listing


def read_remote_image(url: str) -> bytes:
    """One image's bytes, for a build worker. A missing or refused file is the image's problem
    (skipped, named in the manifest); a store that stays down past the retry budget stops the build,
    which resumes from its journal when run again."""
    fs, path = file_system(url, {}, shared=True)
    try:
        size = retrying(lambda: fs.size(path), url, DEFAULT_RETRY_SECONDS)
        if size is not None and size > MAX_REMOTE_IMAGE_BYTES:
            raise SkipImage(f"file too large ({size:,} bytes)")
        data = retrying(lambda: fs.cat_file(path), url, DEFAULT_RETRY_SECONDS)
    except StoreNotFound:
        raise SkipImage("file not found") from None
    except StoreError as error:
        raise SkipImage(f"unreadable: {str(error).split(': ', 1)[-1]}") from None
    if not data:
        raise SkipImage("empty file")
    return data
