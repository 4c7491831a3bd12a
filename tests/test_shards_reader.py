"""The reader splits shards across real ranks (torchrun, gloo) and DataLoader workers: every
sample exactly once, with its label."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from conftest import REPO, run_process, run_shards, write_images
from trainer_helpers import free_port

from shards.reader import open_split, webdataset


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
