"""`OUT/manifest.json`: the one description of a shard folder that every other tool reads."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from shards.errors import UserError
from shards.shard_writer import sync_folder

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"(train|val)-\d{6}\.tar")


class ManifestError(UserError):
    """OUT is not a readable shard folder; the message is one line for the user."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_manifest(out: Path, manifest: dict) -> None:
    temp = out / (MANIFEST_NAME + ".tmp")
    temp.write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(temp, out / MANIFEST_NAME)
    sync_folder(out)  # the rename itself must survive a power loss


def read_manifest(out: Path) -> dict:
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{out} is not a shard folder: {MANIFEST_NAME} is missing (build it with `shards build`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"cannot read {path}: {error}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("image", "splits", "options"):
        if key not in manifest:
            raise ManifestError(f"{path}: missing field {key!r}")
    _check_fields(path, manifest)
    return manifest


def _check_fields(path: Path, manifest: dict) -> None:
    """What the readers rely on. Shard names above all: they are joined to OUT and opened, so only
    names `shards build` writes are accepted (no '../', no 'pipe:')."""
    image = manifest["image"]
    if not isinstance(image, dict) or not all(key in image for key in ("size", "format", "mode")):
        raise ManifestError(f"{path}: image needs size, format and mode")
    for split in SPLITS:
        shards = manifest["splits"].get(split, {}).get("shards")
        if not isinstance(shards, list):
            raise ManifestError(f"{path}: splits.{split}.shards is missing")
        for shard in shards:
            if not isinstance(shard, dict) or not {"name", "count", "sha256"} <= shard.keys():
                raise ManifestError(f"{path}: a shard of {split} lacks name, count or sha256")
            if not isinstance(shard["name"], str) or not SHARD_NAME.fullmatch(shard["name"]):
                raise ManifestError(f"{path}: {shard['name']!r} is not a shard name ({split}-NNNNNN.tar)")
