"""kill -9 a real `shards build` (the whole process group, workers included) at several moments,
rerun the same command, and compare every output byte with an uninterrupted build."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import REPO, folder_bytes, run_shards, started, write_images

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')

SHARD_SIZE = 4
IMAGES = 480


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str], dict[str, bytes]]:
    root = tmp_path_factory.mktemp("resume")
    distinct = write_images(root / "distinct", 24, size=(384, 288))
    source = root / "src"
    source.mkdir()
    for index in range(IMAGES):  # hard links: many inputs, little disk and set-up time
        os.link(distinct[index % len(distinct)], source / f"photo-{index:04d}.png")
    options = ["--shard-size", str(SHARD_SIZE), "--workers", "1", "--val-fraction", "0.2", "--size", "48"]
    reference = root / "reference"
    assert run_shards("build", source, reference, *options).returncode == 0
    return source, options, folder_bytes(reference)


def journaled_shards(out: Path) -> int:
    try:
        return max(0, len((out / ".build" / "journal.jsonl").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return -1


@pytest.mark.parametrize("kill_after_samples", [1, 6, 41, 162])  # in shards 0, 1, 10 and 40 of 4 samples
def test_sigkill_then_rerun_gives_the_uninterrupted_output(tmp_path: Path, corpus, kill_after_samples: int) -> None:
    source, options, reference = corpus
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "tests" / "helpers" / "killed_build.py"), "build", str(source), str(out)]
    environment = {**os.environ, "KILL_AFTER_SAMPLES": str(kill_after_samples)}
    with started([*command, *options], env=environment, start_new_session=True) as process:
        assert process.wait(timeout=120) == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    # the samples go to two writers (train and val), each finishing a shard every SHARD_SIZE of its own
    assert kill_after_samples // SHARD_SIZE - 1 <= journaled_shards(out) <= kill_after_samples // SHARD_SIZE

    rerun = run_shards("build", source, out, *options)
    assert rerun.returncode == 0, rerun.stderr
    if kill_after_samples >= 2 * SHARD_SIZE:
        assert "resuming" in rerun.stderr
    assert folder_bytes(out) == reference
