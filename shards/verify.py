"""`shards verify`: every shard's sha256 against the manifest, and every sample decoded."""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Sequence
from pathlib import Path

from shards.manifest import SPLITS, read_manifest
from shards.parallel import ordered_map
from shards.progress import progress_bar
from shards.samples import decode_image, decode_meta, iter_samples

HASH_BLOCK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check_shard(path: Path, record: dict, image: dict) -> list[str]:
    """Everything wrong with one shard, as short phrases; [] when it is sound."""
    if not path.is_file():
        return ["missing"]
    problems = []
    if file_sha256(path) != record["sha256"]:
        problems.append("sha256 does not match the manifest")
    count = 0
    try:
        for key, members in iter_samples(path):
            count += 1
            problems += _check_sample(key, members, image)
    except (tarfile.TarError, EOFError, OSError) as error:
        problems.append(f"unreadable tar after {count} samples ({error or type(error).__name__})")
    if count != record["count"]:
        problems.append(f"holds {count} samples, the manifest says {record['count']}")
    return problems


def _check_sample(key: str, members: dict[str, bytes], image: dict) -> list[str]:
    if image["format"] not in members or "json" not in members:
        return [f"sample {key}: missing .{image['format']} or .json"]
    try:
        decoded = decode_image(members[image["format"]])
        decode_meta(members["json"])
    except Exception as error:  # any decoder failure is a finding to report, not a crash
        return [f"sample {key}: does not decode ({error})"]
    if decoded.size != (image["size"], image["size"]) or decoded.mode != image["mode"]:
        found = f"{decoded.mode} {decoded.size[0]}x{decoded.size[1]}"
        return [f"sample {key}: is {found}, expected {image['mode']} {image['size']}x{image['size']}"]
    return []


def _check_chunk(jobs: Sequence[tuple[Path, dict]], image: dict) -> list[tuple[str, list[str]]]:
    return [(record["name"], check_shard(path, record, image)) for path, record in jobs]


def verify(out: Path, workers: int) -> list[tuple[str, list[str]]]:
    """Returns (shard name, problems) for every bad shard; [] when all are sound."""
    manifest = read_manifest(out)
    jobs = [(out / shard["name"], shard) for split in SPLITS for shard in manifest["splits"][split]["shards"]]
    bad = []
    with progress_bar("shards") as progress:
        task = progress.add_task("verifying", total=len(jobs))
        for results in ordered_map(_check_chunk, ([job] for job in jobs), workers, manifest["image"]):
            for name, problems in results:
                if problems:
                    bad.append((name, problems))
            progress.advance(task, len(results))
    return bad
