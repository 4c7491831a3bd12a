"""The reader splits shards across real ranks (torchrun, gloo) and DataLoader workers: every
sample exactly once, with its label."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import REPO, run_process, run_shards, write_images
from trainer_helpers import free_port

from shards.format import tar_index
from shards.read.reader import open_split, webdataset

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')


def test_two_ranks_with_two_workers_each_read_every_sample_once(tmp_path: Path) -> None:
    for offset, label in enumerate(("a", "b", "c")):
        write_images(tmp_path / "src" / label, 8, prefix=label, start=8 * offset)
    out = tmp_path / "out"
    built = run_shards("build", tmp_path / "src", out, "--labels", "folder", "--shard-size", "3", "--val-fraction", "0")
    assert built.returncode == 0, built.stderr
    expected = sorted(
        (hashlib.sha256(image.numpy().tobytes()).hexdigest(), label) for image, label in webdataset(open_split(out))
    )
    assert len(expected) == 24 and len({digest for digest, _ in expected}) == 24
    report = tmp_path / "seen"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "helpers" / "read_split_on_rank.py"),
        str(out),
        "train",
        "2",
        str(report),
    ]
    result = run_process(command, 180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    per_rank = [[tuple(item) for item in json.loads(Path(f"{report}.{rank}").read_text())] for rank in (0, 1)]
    assert all(per_rank), "a rank read nothing"
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == expected


def test_a_samples_members_read_at_once_are_what_tarfile_reads(tmp_path: Path) -> None:
    """tar_index.read_sample reads a sample's members with one read: the bytes equal the standard library's,
    also with another member between them (read alone then) and when the shard is cut short."""
    path = tmp_path / "shard.tar"
    contents = {"a.json": b'{"label": 1}', "a.big": os.urandom(5000), "a.png": os.urandom(777)}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in contents.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as file:
        found = {member.name: member for member in tar_index.members(file)}
        for names in (["a.json", "a.big"], ["a.big", "a.png"], ["a.json", "a.png"], ["a.json", "a.big", "a.png"]):
            assert tar_index.read_sample(file, [found[name] for name in names]) == [contents[name] for name in names]
    listed_size = path.stat().st_size  # what a reader that listed the shard knows (no fstat per read)
    with open(path, "rb") as file:
        for names in (["a.json", "a.big"], ["a.big", "a.png"]):
            wanted = [found[name] for name in names]
            assert tar_index.read_sample(file, wanted, listed_size) == [contents[name] for name in names]
    with open(path, "r+b") as file:
        file.truncate(found["a.png"].offset + 100)
        with pytest.raises(tar_index.DamagedTar, match=r"a\.png is cut short"):
            tar_index.read_sample(file, [found["a.big"], found["a.png"]])
        # the shard shrank after it was listed: the short read says so
        with pytest.raises(tar_index.DamagedTar, match="cut short"):
            tar_index.read_sample(file, [found["a.big"], found["a.png"]], listed_size)
        assert tar_index.read_sample(file, [found["a.json"]], listed_size) == [contents["a.json"]]


def test_a_listing_of_many_small_members_matches_tarfile(tmp_path: Path) -> None:
    """tar_index.members reads headers LISTING_READ bytes at a time: with members small and large, across
    the windows' edges, its members are the standard library's, and a truncation is still found."""
    path = tmp_path / "shard.tar"
    sizes = [0, 1, 511, 512, 513, 5000, 70_000, *range(0, 3000, 37)]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for number, size in enumerate(sizes):
            info = tarfile.TarInfo(f"{number:05d}.bin")
            info.size = size
            tar.addfile(info, io.BytesIO(os.urandom(size)))
    with tarfile.open(path) as tar:
        expected = [(member.name, member.offset_data, member.size) for member in tar]
    with open(path, "rb") as file:
        assert [(m.name, m.offset, m.size) for m in tar_index.members(file)] == expected
    cut = expected[len(expected) // 2]
    with open(path, "r+b") as file:
        file.truncate(cut[1] + 10)
        with pytest.raises(tar_index.DamagedTar, match="past the end of the file"):
            list(tar_index.members(file))
