"""Decoding a shard's members (no torch): used by verify and inspect, which read the members with
shards/format/tar_index.py. Members are only ever read into memory, never extracted to disk, so member names
(which come from the file, not from us) can never choose where anything is written.
"""

from __future__ import annotations

import io
import json

from PIL import Image

SHARD_FORMATS = ("PNG", "JPEG", "WEBP")  # what `shards build` writes; nothing else is decoded from a shard


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data), formats=SHARD_FORMATS)
    image.load()
    return image


def decode_meta(data: bytes) -> dict:
    return json.loads(data.decode("utf-8"))
