"""A user error under the launchers (docs/faults.md): every rank finds it, one line says it. Real 2-rank
launches: `python -m pipeline.launch` (what launch/*.sh and launch/slurm.sbatch run) shows that line and
nothing else, exit 2; plain `accelerate launch` shows it once too, then its own report of the failure.
A user error after the process group exists (a full disk): tests/test_checkpoints.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_process
from trainer_helpers import accelerate_launch, build_small_shards, environment, write_config

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')

ERROR = "pipeline train: error: "


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_shards(tmp_path_factory.mktemp("launcher-errors"))


@pytest.mark.parametrize("launcher", ["pipeline.launch", "accelerate.commands.launch"])
def test_a_config_error_is_said_once(tmp_path: Path, shards: Path, launcher: str) -> None:
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "run")
    command = [*accelerate_launch(2, launcher), "-m", "pipeline.train", "--config", str(config), "data.batch_size=-1"]
    result = run_process(command, 300, env=environment())
    said = [line for line in result.stderr.splitlines() if ERROR in line]
    assert len(said) == 1 and "data.batch_size: Input should be greater than 0" in said[0], result.stderr[-3000:]
    if launcher == "pipeline.launch":
        assert result.returncode == 2
        assert result.stderr.splitlines() == said and result.stdout == ""
    else:  # accelerate's own report follows: its traceback, torch's ChildFailedError (docs/faults.md)
        assert result.returncode == 1
    assert not (tmp_path / "run").exists()


def test_every_rank_says_the_cause_first_when_one_rank_stops_on_a_user_error(tmp_path: Path, shards: Path) -> None:
    """Rank 1 stops on a user's error at step 2 (as a rank that met a store gone for good does); rank 0,
    in that step's collectives, loses its peer. Its first line is rank 1's, naming it, instead of
    "Connection closed by peer" and a traceback: every rank's log starts with the cause."""
    config = write_config(
        tmp_path / "run.yaml",
        shards,
        tmp_path / "run",
        model={"hidden": 4, "user_error": {"step": 2, "rank": 1}},
        max_steps=6,
    )
    command = [*accelerate_launch(2, "pipeline.launch"), "-m", "pipeline.train", "--config", str(config)]
    result = run_process(command, 300, env=environment())
    assert result.returncode == 2, result.stderr[-3000:]  # the cause is a user's error: pipeline.launch adds nothing
    said = [line for line in result.stderr.splitlines() if ERROR in line]
    cause = "injected: rank 1 cannot go on at step 2"
    assert len(said) == 2 and all(cause in line for line in said), result.stderr[-3000:]
    peer = next(line for line in said if "rank 1 stopped on it; rank 0 then on" in line)
    assert peer.startswith(ERROR + cause)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
