"""Opening a file that a command reads by name (weights, EMA weights, a manifest, a plan, a checkpoint's
files) without ever blocking: opening a FIFO for reading waits for a writer, for ever if none comes. The
open is non-blocking, and anything but a regular file (a FIFO, a device, a folder) is refused at once."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO


class NotARegularFile(OSError):
    pass


def open_regular(path: str | Path) -> BinaryIO:
    """`path` opened for binary reading; NotARegularFile (an OSError, strerror "not a regular file") when
    it is a FIFO, a device or a folder."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise NotARegularFile(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_regular(path: str | Path) -> bytes:
    with open_regular(path) as file:
        return file.read()


def check_regular(path: str | Path) -> None:
    """Before a library opens `path` by name itself (safetensors, torch.jit): it is a regular file."""
    open_regular(path).close()


def file_sha256(path: str | Path, block_size: int = 1 << 20) -> str:
    """The sha256 of a regular file's bytes, read in blocks (never all held at once)."""
    with open_regular(path) as file:
        return stream_sha256(file, block_size)


def stream_sha256(file: BinaryIO, block_size: int = 1 << 20) -> str:
    """The sha256 of what is left to read in an open binary file, read in blocks."""
    digest = hashlib.sha256()
    while block := file.read(block_size):
        digest.update(block)
    return digest.hexdigest()
