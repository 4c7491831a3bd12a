"""Faults, each done for real: a rank SIGKILLed, SIGTERM (SLURM's preemption notice), non-finite losses
and gradients, shards damaged after the build or missing, and a disk that fills up during a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import run_process
from test_checkpoints import (
    all_tensors,
    assert_bit_identical,
    assert_ok,
    assert_same_bytes,
    checkpoint_steps,
    latest,
    one_error_line,
)
from trainer_helpers import build_small_shards, environment, launch, launch_killed, metrics, run_python, write_config

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_shards(tmp_path_factory.mktemp("faults"))  # 40 images: 7,7,7,7,7,5


def two_rank_config(tmp_path: Path, shards: Path, name: str, **overrides) -> Path:
    """2 ranks x 2 micro-batches of 2 under ZeRO-2, a data worker per rank, a checkpoint every 2 steps, and
    input noise drawn from each rank's RNG, so that a resume matches the run that never stopped only if it
    restores every rank's RNG. A `model` override adds to the noise instead of replacing it."""
    settings = {
        "data": {"shards": str(shards), "batch_size": 2, "workers": 1},
        "max_steps": 6,
        "checkpoint": {"every": 2},
        "model": {"hidden": 4, "noise": 0.1, **overrides.pop("model", {})},
    }
    return write_config(tmp_path / f"{name}.yaml", shards, tmp_path / name, **{**settings, **overrides})


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards: Path) -> Path:
    """The run the interrupted ones are compared with, never stopped."""
    folder = tmp_path_factory.mktemp("straight")
    assert_ok(launch(two_rank_config(folder, shards, "run")))
    return folder / "run"


def test_a_rank_killed_ends_the_job_within_seconds_and_auto_resumes(tmp_path: Path, shards: Path, straight) -> None:
    """Rank 1 alone is SIGKILLed mid-step 3 (checkpoint: step 2). Rank 0 meets the closed connection in its
    next collective and exits with one line, without waiting in the teardown; the launcher ends the job."""
    config = two_rank_config(tmp_path, shards, "run")
    kill_time = tmp_path / "killed-at"
    result = launch_killed(config, "rank_1:5", KILL_TIME_FILE=str(kill_time))
    ended = time.time()
    assert result.returncode != 0
    assert "pipeline train: error: rank 0 stopped on" in result.stderr, result.stderr[-3000:]
    assert ended - float(kill_time.read_text()) < 60  # no hang: measured about 5 s (docs/faults.md)
    assert latest(tmp_path / "run").name == "step-00000002"

    assert_ok(launch(config))  # resume: auto
    assert [record["step"] for record in metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    assert_bit_identical(latest(straight), latest(tmp_path / "run"))


def test_a_frozen_rank_fails_the_job_after_the_collective_timeout(tmp_path: Path, shards: Path) -> None:
    """Rank 1 stops mid-step 3 (SIGSTOP: alive, sockets open, silent, as a hung node), so no connection
    closes: rank 0 gives up in its next collective after faults.collective_timeout_minutes (6 s here) with
    one line, and the launcher kills the frozen rank and ends the job (launch's 300 s timeout: no hang)."""
    config = two_rank_config(tmp_path, shards, "run", faults={"collective_timeout_minutes": 0.1})
    started = time.time()
    result = launch_killed(config, "freeze_1:5")
    assert result.returncode != 0
    assert "pipeline train: error: rank 0 stopped on" in result.stderr, result.stderr[-3000:]
    assert latest(tmp_path / "run").name == "step-00000002"
    print(f"frozen rank: job ended {time.time() - started:.0f} s after launch")


@pytest.mark.parametrize("background", [False, True], ids=["synchronous", "async"])
def test_sigterm_writes_a_checkpoint_exits_0_and_resumes_exactly(tmp_path, shards: Path, straight, background) -> None:
    """SIGTERM to every process of the run (launcher, ranks, data workers), as SLURM sends it, in the middle
    of step 3: both ranks finish step 3, checkpoint it and exit 0, and so does the launcher. With
    checkpoint.async the ranks wait for that checkpoint's background write before they exit."""
    config = two_rank_config(tmp_path, shards, "run", checkpoint={"every": 2, "async": background})
    result = launch_killed(config, "sigterm:5", launcher="pipeline.launch")
    assert_ok(result)
    assert "stopped by SIGTERM after step 3, its checkpoint written" in result.stdout + result.stderr
    assert checkpoint_steps(tmp_path / "run") == ["step-00000002", "step-00000003"]

    assert_ok(launch(config))
    assert_bit_identical(latest(straight), latest(tmp_path / "run"))
    if background:
        assert_same_bytes(latest(straight), latest(tmp_path / "run"))


def updates_skipped(output_dir: Path) -> list[int]:
    return [record["skipped_steps"] for record in metrics(output_dir)]


@pytest.mark.parametrize(
    ("zero_stage", "rank", "kind"), [(2, 1, "gradient"), (0, 0, "loss")], ids=["zero2-rank1-gradient", "zero0-loss"]
)
def test_a_nonfinite_update_is_skipped_on_every_rank_and_counted(tmp_path, shards, zero_stage, rank, kind) -> None:
    """One rank's loss (or only its gradient) is NaN in the 3rd step: no rank applies that update (the
    weights and every optimizer partition after step 3 equal those after step 2), training goes on."""
    config = two_rank_config(
        tmp_path,
        shards,
        "run",
        max_steps=4,
        deepspeed={"zero_stage": zero_stage},
        model={"hidden": 4, "nonfinite": {"steps": [2], "rank": rank, "kind": kind}},
        checkpoint={"every": 1, "keep_last": 4},
    )
    result = launch(config)
    assert_ok(result)
    folders = {step: tmp_path / f"run/checkpoints/step-{step:08d}" for step in (2, 3, 4)}
    after_2, after_3, after_4 = (all_tensors(folder) for folder in folders.values())
    assert after_2.keys() == after_3.keys()
    assert all(torch.equal(after_2[key], after_3[key]) for key in after_2)
    assert not all(torch.equal(after_3[key], after_4[key]) for key in after_3)
    assert all(tensor.isfinite().all() for tensor in after_4.values())
    assert updates_skipped(tmp_path / "run") == [0, 0, 1, 1]
    warnings = [line for line in result.stderr.splitlines() if "non-finite loss or gradient" in line]
    assert len(warnings) == 1 and "step 3" in warnings[0]


def test_nonfinite_steps_in_a_row_stop_the_run_with_one_line(tmp_path: Path, shards: Path) -> None:
    """From the 4th step on every loss is NaN; with faults.max_skipped_steps_in_a_row 3 the run stops at
    step 6, before its checkpoint; step 4's (taken after a skipped update: the weights of step 3) is the
    last good one, and a resume from it trains on."""
    nonfinite = {"steps": list(range(3, 10)), "kind": "loss"}
    config = write_config(
        tmp_path / "run.yaml",
        shards,
        tmp_path / "run",
        max_steps=8,
        model={"hidden": 4, "nonfinite": nonfinite},
        checkpoint={"every": 2},
        faults={"max_skipped_steps_in_a_row": 3},
    )
    line = one_error_line(run_python("-m", "pipeline.train", "--config", str(config)))
    assert "step 6: non-finite loss or gradients for 3 steps in a row" in line
    assert "the last good checkpoint is step-00000004" in line
    assert checkpoint_steps(tmp_path / "run") == ["step-00000002", "step-00000004"]
    assert updates_skipped(tmp_path / "run") == [0, 0, 0, 1, 2, 3]

    assert_ok(run_python("-m", "pipeline.train", "--config", str(config), "model.nonfinite=null"))
    assert latest(tmp_path / "run").name == "step-00000008"
    assert updates_skipped(tmp_path / "run") == [0, 0, 0, 1, 1, 1, 1, 1]  # a running total: step 4 its only skip


def unreadable_after_truncation(shard: Path, cut: int) -> set[int]:
    """Positions of the samples of `shard` that lose a byte when the file is cut at `cut`, from its
    intact tar headers (tarfile, independent of the reader)."""
    with tarfile.open(shard) as tar:
        keys = []
        for info in tar:
            key = info.name.split(".")[0]
            if not keys or keys[-1][0] != key:
                keys.append((key, []))
            keys[-1][1].append(info.offset_data + info.size)
    return {position for position, (_, ends) in enumerate(keys) if max(ends) > cut}


def overwrite_image(shard: Path, position: int) -> None:
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        member = [info for info in tar if info.name.endswith(".png")][position]
    data[member.offset_data : member.offset_data + member.size] = b"\x00" * member.size
    shard.write_bytes(bytes(data))


def test_damaged_shards_lose_only_their_bad_samples_counted_and_named(tmp_path: Path) -> None:
    """After the build, shard 2 is cut in half and one image of shard 4 is overwritten. One epoch on 2 ranks
    of micro-batches of 1 (so some micro-batches are empty): every readable sample trains, the unreadable
    ones are counted exactly, and each damaged shard is named in a warning."""
    shards = build_small_shards(tmp_path / "data")
    cut_shard, overwritten = shards / "train-000002.tar", shards / "train-000004.tar"
    cut = cut_shard.stat().st_size // 2
    expected = len(unreadable_after_truncation(cut_shard, cut)) + 1
    cut_shard.write_bytes(cut_shard.read_bytes()[:cut])
    overwrite_image(overwritten, 3)

    config = two_rank_config(
        tmp_path, shards, "run", data={"shards": str(shards), "batch_size": 1, "workers": 1}, max_steps=10
    )
    result = launch(config)  # 40 samples / (2 ranks x 1 x 2 accumulation): one epoch in 10 steps
    assert_ok(result)
    assert 3 <= expected < 7
    assert metrics(tmp_path / "run")[-1]["bad_samples"] == expected
    state = json.loads((latest(tmp_path / "run") / "trainer_state.json").read_text())
    assert state["bad_samples"] == expected
    warnings = [line for line in result.stderr.splitlines() if "is unreadable" in line]
    assert {Path(line.split(": ")[3]).name for line in warnings} == {cut_shard.name, overwritten.name}
    assert any("cut short" in line or "the shard ends after" in line for line in warnings)


def test_a_missing_shard_fails_at_start_with_one_line(tmp_path: Path) -> None:
    shards = build_small_shards(tmp_path / "data")
    (shards / "train-000003.tar").unlink()
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "run")
    line = one_error_line(run_python("-m", "pipeline.train", "--config", str(config)))
    assert "shard(s) of the manifest are missing, first train-000003.tar" in line
    assert not (tmp_path / "run").exists()


def disk_usage(folder: Path) -> int:
    return int(
        subprocess.run(["du", "-s", "--block-size=1", str(folder)], capture_output=True, text=True).stdout.split()[0]
    )


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path: Path, shards: Path) -> None:
    """The run's output folder on a real tmpfs (in a private mount namespace) with room for one checkpoint
    and a half: step 4's checkpoint meets ENOSPC; the run stops with one line, removes what it had
    written of step 4, and step 2's checkpoint resumes elsewhere."""
    settings = {"max_steps": 4, "checkpoint": {"every": 2}, "model": {"hidden": 512}, "sample_every": 100}
    measured = write_config(tmp_path / "measure.yaml", shards, tmp_path / "measure", **{**settings, "max_steps": 2})
    assert_ok(run_python("-m", "pipeline.train", "--config", str(measured)))
    checkpoint_size = disk_usage(tmp_path / "measure/checkpoints/step-00000002")
    room = disk_usage(tmp_path / "measure") + checkpoint_size // 2

    mount, kept = tmp_path / "small-disk", tmp_path / "kept"
    mount.mkdir()
    config = write_config(tmp_path / "run.yaml", shards, mount / "run", **settings)
    script = (
        f"mount -t tmpfs -o size={room} tmpfs {mount} || exit 99; "
        f"{sys.executable} -m pipeline.train --config {config}; status=$?; "
        f"cp -a {mount}/run {kept}; exit $status"
    )
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]
    result = run_process(command, 300, env=environment())
    assert result.returncode != 99, f"cannot mount a tmpfs here: {result.stderr}"
    line = one_error_line(result)
    assert "step 4" in line and "No space left on device" in line and "step-00000002 is intact" in line
    assert sorted(path.name for path in (kept / "checkpoints").iterdir()) == ["latest", "step-00000002"]

    again = write_config(tmp_path / "again.yaml", shards, kept, **settings)
    assert_ok(run_python("-m", "pipeline.train", "--config", str(again)))
    assert [record["step"] for record in metrics(kept)] == [1, 2, 3, 4]
    assert latest(kept).name == "step-00000004"
