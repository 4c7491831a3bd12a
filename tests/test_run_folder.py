"""A run folder is held by one run at a time, and a run's ranks end with their launcher (docs/faults.md):
done for real, by freezing, relaunching into and SIGKILLing a live 2-rank run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import run_process, started, tagged_processes
from test_checkpoints import assert_ok, latest
from trainer_helpers import accelerate_launch, build_small_shards, environment, launch, metrics, write_config

from pipeline.training.run_lock import LOCK_FILE, RunLock
from shards.errors import UserError


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_shards(tmp_path_factory.mktemp("run-folder"))


def wait_for(condition, what: str, process: subprocess.Popen, bound: float = 240) -> None:
    """Polls `condition` while `process` lives; the bound is a generous "no hang" limit, not a timing."""
    deadline = time.monotonic() + bound
    while not condition():
        assert process.poll() is None, f"the run ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {bound} s"
        time.sleep(0.05)


def logged_steps(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def living(pids: list[int]) -> list[int]:
    """Those still running: an orphan that died may stay a zombie until init reaps it."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def folder_state(folder: Path) -> dict[str, bytes | None]:
    """Every path under the folder, with the bytes of each file."""
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None for path in folder.rglob("*")}


@pytest.mark.slow
def test_a_held_folder_refuses_a_second_run_and_ranks_die_with_their_launcher(tmp_path: Path, shards: Path) -> None:
    """Run A (plain `accelerate launch`, a process group of its own, a data worker per rank) is frozen mid-run
    (SIGSTOP to its ranks and workers). The same command run again through `pipeline.launch` ends with one
    line naming A's rank 0, exit 2, and changes nothing in the folder. A resumes and its launcher's whole
    process group is SIGKILLed: torch starts each rank in a session of its own, outside that group, so
    only their parent-death signal can end them; no process of A is left. The same command then resumes
    from A's last checkpoint, and metrics.jsonl holds one line per step, A's lines up to it untouched."""
    output_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml",
        shards,
        output_dir,
        max_steps=60,
        checkpoint={"every": 5},
        sample_every=1000,
        data={"shards": str(shards), "batch_size": 2, "workers": 1},
    )
    command = ["-m", "pipeline.train", "--config", str(config)]
    with (
        open(tmp_path / "a.out", "w") as out,
        started(
            [*accelerate_launch(2), *command], env=environment(), stdout=out, stderr=out, start_new_session=True
        ) as run_a,
    ):
        wait_for(lambda: (output_dir / "checkpoints/latest").exists(), "first checkpoint", run_a)
        processes = psutil.Process(run_a.pid).children(recursive=True)  # 2 ranks, a data worker each
        assert len(psutil.Process(run_a.pid).children()) == 2 and len(processes) == 4, processes
        for process in processes:
            process.send_signal(signal.SIGSTOP)
        time.sleep(0.5)  # a signal is delivered at once, but a rank may have been mid-write
        rank_0 = next(process.pid for process in processes if process.environ().get("RANK") == "0")
        frozen = folder_state(output_dir)

        second = run_process([*accelerate_launch(2, "pipeline.launch"), *command], 300, env=environment())
        assert second.returncode == 2, second.stderr[-3000:]
        [line] = second.stderr.splitlines()
        holder = f"output_dir: {output_dir} is in use by another run (pid {rank_0} on "
        assert line.startswith(f"pipeline train: error: {holder}")
        assert folder_state(output_dir) == frozen

        for process in processes:
            process.send_signal(signal.SIGCONT)
        steps_before = logged_steps(output_dir)
        wait_for(lambda: logged_steps(output_dir) > steps_before, "step after the thaw", run_a)
        killed_at, steps_at_kill = time.monotonic(), logged_steps(output_dir)
        os.killpg(run_a.pid, signal.SIGKILL)
        run_a.wait()
        pids = [process.pid for process in processes]
        while living(pids) and time.monotonic() - killed_at < 60:  # no hang: measured well under a second
            time.sleep(0.05)
        assert living(pids) == [] and tagged_processes(run_a.tag) == []
        print(f"ranks and workers gone {time.monotonic() - killed_at:.2f} s after the kill")
        # orphans would have trained on (the run's 60 steps take less than the bound above)
        assert logged_steps(output_dir) <= steps_at_kill + 1  # + a line being written at the kill
        resumed_from = int(latest(output_dir).name.removeprefix("step-"))
        lines_before = (output_dir / "metrics.jsonl").read_text().splitlines()
    assert 5 <= resumed_from < 60

    assert_ok(launch(config))
    assert [record["step"] for record in metrics(output_dir)] == list(range(1, 61))
    lines_after = (output_dir / "metrics.jsonl").read_text().splitlines()
    assert lines_after[:resumed_from] == lines_before[:resumed_from]  # resumed, not started again
    assert latest(output_dir).name == "step-00000060"


HOLDER = """
import sys, time
from pathlib import Path
from pipeline.training.run_lock import RunLock
RunLock(Path(sys.argv[1]), print).take()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_the_lock_dies_with_its_holder_and_a_refused_run_creates_nothing(tmp_path: Path) -> None:
    """In-process, against a holder in another process (a process never conflicts with its own locks)."""
    output_dir = tmp_path / "run"
    RunLock(output_dir, print).take_if_present()  # no lock file: nothing to hold, nothing created
    assert not output_dir.exists()

    command = [sys.executable, "-c", HOLDER, str(output_dir)]
    with started(command, env=environment(), stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout.readline() == "held\n"
        record = (output_dir / LOCK_FILE).read_text()
        assert record.startswith(f"pid {holder.pid} on ")
        for take in (RunLock.take_if_present, RunLock.take):
            with pytest.raises(UserError, match=f"is in use by another run \\(pid {holder.pid} on "):
                take(RunLock(output_dir, print))
        assert (output_dir / LOCK_FILE).read_text() == record
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    lock = RunLock(output_dir, print)
    lock.take_if_present()  # a dead holder's lock is free: the kernel dropped it
    assert (output_dir / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
    os.close(lock.fd)
