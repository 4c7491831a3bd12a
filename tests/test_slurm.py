"""launch/slurm.sbatch on a real SLURM (Debian's slurmctld, slurmd and munge on this machine, bound to
127.0.0.1; tests/slurm_cluster.py), with CPU ranks standing in for GPUs: a job stopped by `scancel -s TERM`
checkpoints and ends COMPLETED with exit code 0, its log keeps the line that says so when the next
attempt appends to it, and the resubmitted job resumes to weights bit-identical to a job never stopped."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from slurm_cluster import one_machine_slurm, program
from test_checkpoints import assert_bit_identical, checkpoint_steps, latest
from trainer_helpers import build_small_shards, environment, free_port, metrics, write_config

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')

STEPS = 10


def submit(slurm, config: Path, log: Path, name: str) -> int:
    """The README's command (CONFIG=... sbatch launch/slurm.sbatch) for one node of 2 CPU ranks."""
    env = {
        **environment(),
        "CONFIG": str(config),
        "PROCS_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    options = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10", f"--job-name={name}"]
    options += [f"--output={log}", f"--chdir={REPO}"]
    return slurm.submit(*options, str(REPO / "launch" / "slurm.sbatch"), env=env)


def test_a_job_stopped_by_sigterm_checkpoints_exits_0_and_resumes_exactly_when_resubmitted(tmp_path: Path) -> None:
    shards = build_small_shards(tmp_path / "data", images=40, size=8)
    model = {"hidden": 4, "noise": 0.1, "seconds_per_micro_batch": 0.15}  # noise: each rank's RNG must resume
    common = {"max_steps": STEPS, "model": model, "checkpoint": {"every": 2, "keep_last": 10}}
    straight = write_config(tmp_path / "straight.yaml", shards, tmp_path / "straight", **common)
    stopped = write_config(tmp_path / "stopped.yaml", shards, tmp_path / "stopped", **common)
    log = tmp_path / "stopped.log"
    with one_machine_slurm(tmp_path / "slurm", cpus=len(os.sched_getaffinity(0))) as slurm:
        job = slurm.wait(submit(slurm, straight, tmp_path / "straight.log", "straight"))
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (tmp_path / "straight.log").read_text()

        first = submit(slurm, stopped, log, "stopped")
        deadline = time.monotonic() + 240
        while not (tmp_path / "stopped" / "checkpoints" / "step-00000002").exists():
            assert time.monotonic() < deadline and slurm.job(first)["JobState"] in ("PENDING", "RUNNING"), (
                log.read_text()
            )
            time.sleep(0.2)
        slurm.command(program("scancel"), "--signal=TERM", str(first))
        job = slurm.wait(first)
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()
        stopped_at = len(metrics(tmp_path / "stopped"))
        assert 2 <= stopped_at < STEPS
        assert f"stopped by SIGTERM after step {stopped_at}, its checkpoint written" in log.read_text()
        assert checkpoint_steps(tmp_path / "stopped")[-1] == f"step-{stopped_at:08d}"

        second = slurm.wait(submit(slurm, stopped, log, "stopped"))
        assert (second["JobState"], second["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()
    text = log.read_text()
    assert "stopped by SIGTERM" in text  # --open-mode=append: the first attempt's lines are still there
    assert [record["step"] for record in metrics(tmp_path / "stopped")] == list(range(1, STEPS + 1))
    assert_bit_identical(latest(tmp_path / "straight"), latest(tmp_path / "stopped"))
