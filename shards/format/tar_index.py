"""The members of a shard's tar, read from its headers alone, and strictly.

Shards are USTAR archives of regular files (shards/format/shard_writer.py). Each 512-byte header is checked
before anything it says is used: its checksum, its type (a regular file), its size (octal digits). No
number from a header ever sizes an allocation: a member's bytes are read only once they are known to
lie inside the file. (The standard library's tarfile, given a header whose size says 2^62, tries to
allocate that much, and raises MemoryError or OverflowError rather than a TarError.)

A damaged header ends the listing with DamagedTar, which says at which byte and what is wrong; the
members before it are yielded and stay usable. A member whose data runs past the end of the file (a
truncated shard, or a header whose size was overwritten) is yielded, for its reader to report as cut
short, and ends the listing.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

BLOCK = 512
REGULAR_FILE = (b"0", b"\0")
NAME, SIZE, CHECKSUM, TYPE, PREFIX = slice(0, 100), slice(124, 136), slice(148, 156), slice(156, 157), slice(345, 500)


LISTING_READ = 64 * 1024


class DamagedTar(tarfile.TarError):
    """A header that cannot be trusted, or a member whose data the file does not hold (a TarError, as
    the standard library's reader would raise for a damaged tar)."""


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # where its data starts
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


def _octal(field: bytes, what: str, at: int) -> int:
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    if not digits or digits.translate(None, b"01234567"):  # translate: what is left besides octal digits
        raise DamagedTar(f"the header at byte {at} has no octal {what} ({field!r})")
    return int(digits, 8)


def _parse_header(block: bytes, at: int) -> tuple[str, int]:
    """(name, size) of a regular-file header; DamagedTar for anything else."""
    stored = _octal(block[CHECKSUM], "checksum", at)
    if stored != sum(block) - sum(block[CHECKSUM]) + 8 * ord(" "):  # the field itself counted as spaces
        raise DamagedTar(f"the header at byte {at} fails its checksum")
    if block[TYPE] not in REGULAR_FILE:
        raise DamagedTar(f"the member at byte {at} is not a regular file (type {block[TYPE]!r})")
    size = _octal(block[SIZE], "size", at)
    prefix, name = (block[part].split(b"\0", 1)[0] for part in (PREFIX, NAME))
    try:
        name_text = (prefix + b"/" + name if prefix else name).decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedTar(f"the member name at byte {at} is not UTF-8") from None
    if not name_text or not name_text.isprintable():  # it ends up in messages: one line, no escapes
        raise DamagedTar(f"the member at byte {at} has no name, or one with control characters")
    return name_text, size


def members(file: BinaryIO) -> Iterator[Member]:
    """Every member of the tar open in `file` (binary, seekable), in file order."""
    descriptor = file.fileno()
    file_size = os.fstat(descriptor).st_size
    at, window, window_start = 0, b"", 0
    while True:
        # headers read LISTING_READ bytes at a time: a shard of small images has dozens of headers in one
        # read (a read per header: a 32x32 shard listed in 17.7 us a sample, now 13.8); one of large images
        # a read per header, no longer than the kernel's readahead
        offset = at - window_start
        if offset + BLOCK > len(window):
            window, window_start, offset = os.pread(descriptor, LISTING_READ, at), at, 0
        block = window[offset : offset + BLOCK]
        if len(block) < BLOCK:
            raise DamagedTar(f"the file ends at byte {file_size}, before the tar's end marker (truncated?)")
        if block == bytes(BLOCK):
            return
        name, size = _parse_header(block, at)
        member = Member(name, at + BLOCK, size)
        yield member
        if member.end > file_size:
            raise DamagedTar(
                f"{name} at byte {at} says it holds {size} bytes, past the end of the file at byte {file_size} "
                "(truncated, or a damaged header)"
            )
        at = member.offset + -(-size // BLOCK) * BLOCK


def samples(file: BinaryIO) -> Iterator[tuple[str, dict[str, Member]]]:
    """(key, {extension: member}) per sample: webdataset's grouping of adjacent members `<key>.<ext>`.
    At a damaged header, the sample being read is yielded as far as it got, then DamagedTar raised."""
    key, group = None, {}
    listing = members(file)
    while True:
        try:
            member = next(listing, None)
        except DamagedTar:
            if group:
                yield key, group
            raise
        if member is None:
            break
        stem, _, extension = member.name.partition(".")
        if group and stem != key:
            yield key, group
            group = {}
        key = stem
        group[extension] = member
    if group:
        yield key, group


def read(file: BinaryIO, member: Member) -> bytes:
    """The member's bytes; DamagedTar when the file does not hold them all (nothing is read then)."""
    file_size = os.fstat(file.fileno()).st_size
    if member.end > file_size:
        raise DamagedTar(f"its {member.name} is cut short at byte {file_size} (the shard is truncated)")
    file.seek(member.offset)
    data = file.read(member.size)
    if len(data) != member.size:  # the file shrank meanwhile
        raise DamagedTar(f"its {member.name} is cut short (the shard is truncated)")
    return data


def read_sample(file: BinaryIO, wanted: list[Member], listed_size: int | None = None) -> list[bytes]:
    """The bytes of a sample's members (adjacent in the tar) with one read from the first to the last:
    a training worker's per-sample cost, two buffered seeks and reads otherwise. DamagedTar as read().
    listed_size: the file's size when it was listed, if known: members inside it need no fstat per read
    to bound the read (a file that shrank since gives a short read, DamagedTar too)."""
    start, end = min(member.offset for member in wanted), max(member.end for member in wanted)
    if end - start > sum(member.size for member in wanted) + 2 * BLOCK * len(wanted):
        return [read(file, member) for member in wanted]  # other members lie between them: not read
    descriptor = file.fileno()
    inside = listed_size is not None and end <= listed_size
    file_size = listed_size if inside else os.fstat(descriptor).st_size
    if end > file_size:
        cut = next(member for member in wanted if member.end > file_size)
        raise DamagedTar(f"its {cut.name} is cut short at byte {file_size} (the shard is truncated)")
    span = os.pread(descriptor, end - start, start)
    if len(span) != end - start:  # the file shrank meanwhile
        raise DamagedTar("a member is cut short (the shard is truncated)")
    return [span[member.offset - start : member.end - start] for member in wanted]


def read_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of the shard at `path`, in file order; DamagedTar where the
    shard is damaged (after the samples before it)."""
    with open(path, "rb") as file:
        for key, group in samples(file):
            yield key, {extension: read(file, member) for extension, member in group.items()}
