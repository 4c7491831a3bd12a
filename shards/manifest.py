"""`OUT/manifest.json`: the one description of a shard folder that every other tool reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

from shards.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")


class ManifestError(UserError):
    """OUT is not a readable shard folder; the message is one line for the user."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_manifest(out: Path, manifest: dict) -> None:
    temp = out / (MANIFEST_NAME + ".tmp")
    temp.write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(temp, out / MANIFEST_NAME)


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
    return manifest
