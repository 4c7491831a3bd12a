"""Reading samples straight out of one shard file (no torch): used by verify and inspect.

Members are read into memory by the tar iterator; nothing is ever extracted to disk, so member
names (which come from the file, not from us) can never choose where anything is written.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

SHARD_FORMATS = ("PNG", "JPEG", "WEBP")  # what `shards build` writes; nothing else is decoded from a shard


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) per sample, in file order. Raises tarfile.TarError or
    EOFError on a damaged tar."""
    key, members = None, {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                raise tarfile.TarError(f"unexpected non-file member {info.name!r}")
            stem, _, extension = info.name.partition(".")
            if key is not None and stem != key:
                yield key, members
                members = {}
            key = stem
            data = tar.extractfile(info)
            members[extension] = data.read() if data else b""
    if key is not None:
        yield key, members


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data), formats=SHARD_FORMATS)
    image.load()
    return image


def decode_meta(data: bytes) -> dict:
    return json.loads(data.decode("utf-8"))
