"""What `shards build` reads: a folder tree of images, or a .txt/.csv file listing image paths.

Only paths and labels are held in memory (about 150 bytes an image); images are read later, one
at a time, by the workers.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shards.errors import UserError
from shards.store.remote import is_remote

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
LIST_SUFFIXES = frozenset({".txt", ".csv", ".lst"})


class SkipImage(Exception):
    """An input that cannot become a training image; the message is the reason users see."""


class SourceError(UserError):
    """SRC itself is unusable (missing, unreadable, empty); the message is one line for the user."""


@dataclass(frozen=True)
class Entry:
    """One input image: `relpath` is what the manifest records, `path` is what gets opened."""

    relpath: str
    path: str
    label: str | None

    @property
    def key(self) -> str:
        return sample_key(self.relpath)

    def absolute(self) -> Entry:
        """With an absolute path: parts and Ray tasks run in other working folders, on other machines."""
        return self if "://" in self.path else Entry(self.relpath, os.path.abspath(self.path), self.label)


@dataclass
class Listing:
    entries: list[Entry]
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    fingerprint: str = ""

    @property
    def label_names(self) -> list[str] | None:
        names = sorted({entry.label for entry in self.entries if entry.label is not None})
        return names or None


def sample_key(relpath: str) -> str:
    """The webdataset `__key__`: a hash, so odd names (dots, spaces, unicode, '..') stay safe."""
    return hashlib.blake2b(relpath.encode("utf-8", "surrogateescape"), digest_size=10).hexdigest()


def printable(name: str) -> str:
    """A file name for the manifest: undecodable bytes shown as \\xNN, as they are on disk."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def scan_local_sources(
    src: Path, labels_from_folders: bool, exclude: Path | None, rejected: list[tuple[str, str]]
) -> Iterator[Entry]:
    """SRC's inputs in the order the file system gives them, one at a time (`shards plan` holds none of
    them in memory); what is not an input is appended to `rejected` as (relpath, reason)."""
    if not src.exists():
        raise SourceError(f"SRC does not exist: {src}")
    if src.is_dir():
        return _walk_folder(src, labels_from_folders, exclude.resolve() if exclude else None, rejected)
    if src.suffix.lower() in LIST_SUFFIXES:
        if labels_from_folders:
            raise SourceError("--labels folder needs SRC to be a folder; a list file gives labels in a column")
        return _read_list(src, rejected)
    raise SourceError(f"SRC must be a folder or a .txt/.csv list of image paths, got {src}")


def _walk_folder(
    root: Path, labels_from_folders: bool, exclude: Path | None, rejected: list[tuple[str, str]]
) -> Iterator[Entry]:
    try:
        os.scandir(root).close()
    except OSError as error:
        raise SourceError(f"cannot read SRC {root}: {error.strerror}") from None
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            children = list(os.scandir(folder))
        except OSError as error:
            rejected.append((printable(os.path.relpath(folder, root)), f"unreadable folder: {error.strerror}"))
            continue
        for child in children:
            relpath = os.path.relpath(child.path, root)
            if child.is_dir(follow_symlinks=False):
                if exclude is not None and Path(child.path).resolve() == exclude:
                    continue  # OUT inside SRC: our own output is never input
                if child.name.startswith("."):
                    rejected.append((printable(relpath), "hidden folder (not read)"))
                else:
                    pending.append(Path(child.path))
                continue
            if child.is_symlink() and child.is_dir():
                rejected.append((printable(relpath), "symbolic link to a folder (not followed)"))
                continue
            reason = name_problem(relpath)
            label = relpath.split(os.sep, 1)[0] if labels_from_folders and os.sep in relpath else None
            if reason is None and labels_from_folders and label is None:
                reason = "not inside a label folder (--labels folder)"
            if reason:
                rejected.append((printable(relpath), reason))
            else:
                yield Entry(relpath=relpath, path=child.path, label=label)


def name_problem(relpath: str) -> str | None:
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    name = os.path.basename(relpath)
    if name.startswith("."):
        return "hidden file"
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in IMAGE_SUFFIXES:
        return f"not an image file name ({suffix or 'no extension'})"
    return None


HEADER_WORDS = frozenset({"path", "file", "filename", "image", "label", "class", "category"})


def _list_rows(list_file: Path) -> list[list[str]]:
    try:
        text = list_file.read_text(encoding="utf-8-sig")  # -sig: spreadsheet programs prefix a BOM
    except (OSError, UnicodeDecodeError) as error:
        raise SourceError(f"cannot read list file {list_file}: {error}") from None
    return parse_list_rows(text, list_file.suffix.lower() == ".csv", list_file)


def parse_list_rows(text: str, is_csv: bool, where: object) -> list[list[str]]:
    """Rows of a list file: `.csv` is CSV (path, optional label); `.txt`/`.lst` hold one path a line,
    with an optional label after a tab. A header row of column names is dropped."""
    try:
        lines = text.splitlines()
        rows = list(csv.reader(lines)) if is_csv else [line.split("\t", 1) for line in lines]
    except csv.Error as error:
        raise SourceError(f"cannot parse list file {where}: {error}") from None
    if rows and rows[0] and all(cell.strip().lower() in HEADER_WORDS for cell in rows[0] if cell.strip()):
        rows = rows[1:]
    return rows


def _read_list(list_file: Path, rejected: list[tuple[str, str]]) -> Iterator[Entry]:
    root = list_file.parent.resolve()
    seen: set[str] = set()
    for row in _list_rows(list_file):
        if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
            continue
        given = row[0].strip()
        label = row[1].strip() if len(row) > 1 and row[1].strip() else None
        if is_remote(given):  # read by the workers from the store (shards/build/remote_sources.py)
            if given in seen:
                rejected.append((given, "listed twice"))
            else:
                seen.add(given)
                yield Entry(relpath=given, path=given, label=label)
            continue
        path = os.path.normpath(os.path.join(root, given))
        inside = path == str(root) or path.startswith(str(root) + os.sep)
        # paths under the list's folder are recorded relative to it; absolute paths elsewhere as given
        relpath = os.path.relpath(path, root) if inside else path
        if "\0" in given:
            rejected.append((given.replace("\0", "\\0"), "path contains a NUL byte"))
        elif not os.path.isabs(given) and not inside:
            rejected.append((given, "path leaves SRC ('..')"))
        elif relpath in seen:
            rejected.append((given, "listed twice"))
        else:
            seen.add(relpath)
            yield Entry(relpath=relpath, path=path, label=label)


class Fingerprint:
    """Changes when a listed file is added, removed, relabelled, resized or touched: a resumed build must
    never mix shards made from two different versions of SRC. A sum of one hash per input, so that it does
    not depend on the order the inputs are found in (`shards plan` never sorts the whole listing)."""

    def __init__(self) -> None:
        self.total, self.count = 0, 0

    def add(self, entry: Entry) -> Entry:
        try:
            stat = os.stat(entry.path)
            signature = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            signature = "missing"
        line = f"{entry.relpath}\0{entry.label}\0{signature}\n".encode("utf-8", "surrogateescape")
        self.total = (self.total + int.from_bytes(hashlib.blake2b(line).digest(), "big")) % 2**512
        self.count += 1
        return entry

    def hexdigest(self) -> str:
        return hashlib.sha256(f"{self.count}:{self.total:0128x}".encode()).hexdigest()
