"""`shards verify`: every shard's sha256 against the manifest, every tar header checked (shards/format/tar_index.py),
and every sample decoded. A remote folder's shards are fetched into the node-local cache first."""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from PIL import Image

from shards.build.parallel import ordered_map
from shards.format import tar_index
from shards.format.manifest import SPLITS
from shards.format.samples import SHARD_FORMATS
from shards.progress import progress_bar
from shards.read.folder import ShardFolder
from shards.read.shard_cache import DamagedShard
from shards.regular_files import file_sha256
from shards.store.failures import StoreNotFound
from shards.store.remote import RemoteAccess


def check_shard(path: Path, record: dict, image: dict) -> list[str]:
    """Everything wrong with one shard, as short phrases; [] when it is sound."""
    if not path.is_file():
        return ["missing"]
    problems = []
    if file_sha256(path) != record["sha256"]:
        problems.append("sha256 does not match the manifest")
    count = 0
    try:
        for key, members in tar_index.read_samples(path):
            problems += _check_sample(key, members, image)
            count += 1
    except (tar_index.DamagedTar, OSError) as error:
        problems.append(f"unreadable tar after {count} samples ({error or type(error).__name__})")
    if count != record["count"]:
        problems.append(f"holds {count} samples, the manifest says {record['count']}")
    return problems


def _check_sample(key: str, members: dict[str, bytes], image: dict) -> list[str]:
    if image["format"] not in members or "json" not in members:
        return [f"sample {key}: missing .{image['format']} or .json"]
    expected = (image["mode"], (image["size"], image["size"]))
    try:
        # opened lazily: its header is checked before a damaged one can size the decoded pixels
        with Image.open(io.BytesIO(members[image["format"]]), formats=SHARD_FORMATS) as decoded:
            found = (decoded.mode, decoded.size)
            if found == expected:
                decoded.load()
        meta = json.loads(members["json"].decode("utf-8"))
    except Exception as error:  # any decoder failure is a finding to report, not a crash
        return [f"sample {key}: does not decode ({error})"]
    if found != expected:
        mode, (width, height) = found
        return [f"sample {key}: is {mode} {width}x{height}, expected {image['mode']} {image['size']}x{image['size']}"]
    label = meta.get("label", -1) if isinstance(meta, dict) else None
    if type(label) is not int or label < -1:
        return [f"sample {key}: its .json is not an object with an integer label >= -1"]
    return []


def check_folder_shard(folder: ShardFolder, record: dict, image: dict) -> list[str]:
    """check_shard on a shard wherever it is: a remote one is fetched into verify's own cache (which
    compares its sha256 with the manifest, twice before it calls it damaged), checked, and let go."""
    try:
        path = folder.local_path(record)
    except StoreNotFound:
        return ["missing"]
    except DamagedShard:
        return ["sha256 does not match the manifest (fetched twice)"]
    try:
        return check_shard(path, record, image)
    finally:
        if folder.remote is not None:
            path.unlink(missing_ok=True)


def _check_chunk(jobs: Sequence[tuple[ShardFolder, dict]], image: dict) -> list[tuple[str, list[str]]]:
    return [(record["name"], check_folder_shard(folder, record, image)) for folder, record in jobs]


def verify(out: str | Path, workers: int, access: RemoteAccess | None = None) -> list[tuple[str, list[str]]]:
    """Returns (shard name, problems) for every bad shard of a local or remote folder; [] when all are
    sound. A remote folder's bytes are read from the store itself, never from the node's shard cache
    (content-addressed, it would hold good copies of shards damaged on the store since)."""
    with tempfile.TemporaryDirectory(prefix="shards-verify-") as own_cache:
        access = replace(access or RemoteAccess(), cache_dir=Path(own_cache), cache_limit=None)
        return _verify(ShardFolder.at(out, access), workers)


def _verify(folder: ShardFolder, workers: int) -> list[tuple[str, list[str]]]:
    manifest = folder.manifest()
    jobs = [(folder, shard) for split in SPLITS for shard in manifest["splits"][split]["shards"]]
    bad = []
    with progress_bar("shards") as progress:
        task = progress.add_task("verifying", total=len(jobs))
        for results in ordered_map(_check_chunk, ([job] for job in jobs), workers, manifest["image"]):
            for name, problems in results:
                if problems:
                    bad.append((name, problems))
            progress.advance(task, len(results))
    return bad
