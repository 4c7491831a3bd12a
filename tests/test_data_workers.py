"""DataLoader workers of the training stream live and die with their rank (pipeline/data/workers.py): no
exit path waits on them for ever, whatever exit hook runs first; SIGTERM from elsewhere (SLURM) is left to
the rank; a rank that dies takes its workers with it. Real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_process, started
from test_data_stream import stream
from trainer_helpers import build_small_shards, environment

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')

HELPER = str(REPO / "tests" / "helpers" / "loader_exit.py")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_shards(tmp_path_factory.mktemp("workers"))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(path: Path, seconds: float = 120) -> dict:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never written"
        time.sleep(0.05)
    time.sleep(0.1)  # written in one call, but not atomically
    return json.loads(path.read_text())


@pytest.mark.parametrize("exit_hook_first", ["0", "1"])
def test_a_process_that_used_the_loader_exits_whatever_exit_hook_runs_first(tmp_path, shards, exit_hook_first):
    report = tmp_path / "report"
    env = {**environment(), "EXIT_HOOK_FIRST": exit_hook_first}
    result = run_process([sys.executable, HELPER, str(shards), str(report), "exit"], 60, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    workers = json.loads(report.read_text())["workers"]
    assert len(workers) == 2
    assert not any(alive(pid) for pid in workers)


def test_sigterm_from_elsewhere_leaves_the_workers_to_their_rank(tmp_path: Path, shards: Path) -> None:
    """As SLURM does: SIGTERM to the workers from another process. They go on serving the rank."""
    report = tmp_path / "report"
    command = [sys.executable, HELPER, str(shards), str(report), "wait"]
    with started(command, env=environment()) as process:
        workers = wait_for(report)["workers"]
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        time.sleep(1)
        assert all(alive(pid) for pid in workers)
        Path(f"{report}.go").touch()
        assert process.wait(timeout=60) == 0
    assert json.loads(Path(f"{report}.after").read_text()) == [2, 2, 2]


def test_workers_die_with_their_rank(tmp_path: Path, shards: Path) -> None:
    report = tmp_path / "report"
    with started([sys.executable, HELPER, str(shards), str(report), "sleep"], env=environment()) as process:
        workers = wait_for(report)["workers"]
        assert len(workers) == 2 and all(alive(pid) for pid in workers)
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "a data worker outlived its rank"
            time.sleep(0.05)


@pytest.mark.parametrize("repetition", range(2))
def test_two_ranks_reading_the_stream_exit_every_time(tmp_path: Path, shards: Path, repetition: int) -> None:
    """The helper that once hung at exit (tests/helpers/stream_on_rank.py), a few times in a row; the
    200-run stress is scripts/stress_loader_exit.py."""
    ranks = stream(shards, tmp_path / "report", start=0, steps=3, timeout=90)
    assert all(len(rank["seen"]) == 3 for rank in ranks)
