"""`scripts/demo.sh`, the README's first command, run for real at a toy length on the digits: a rerun
resumes an unfinished run from its last checkpoint (it used to delete the folder and start over), starts a
finished one over, and its last line says which it did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_process
from trainer_helpers import environment

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')

TOY = "data.batch_size=4 grid_size=4 log_every=1 checkpoint.every=2 sample_every=2 ema.start_step=0"


def demo(tmp_path: Path, overrides: str) -> str:
    env = {
        **environment(),
        "DEMO_NO_SETUP": "1",
        "DEMO_SOURCE": "digits",
        "DEMO_DATA": str(tmp_path / "data"),
        "DEMO_RUN": str(tmp_path / "run"),
        "DEMO_OVERRIDES": f"{overrides} {TOY}",
    }
    result = run_process(["bash", str(REPO / "scripts" / "demo.sh")], 600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def steps_logged(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"step"' in line and "images" in line]


def test_a_rerun_resumes_an_unfinished_demo_and_restarts_a_finished_one(tmp_path: Path) -> None:
    first = demo(tmp_path, "max_steps=2")
    assert first.startswith("demo: a new run, finished:"), first
    # the same run asked to go further: unfinished, so the rerun resumes it, not a fresh start
    second = demo(tmp_path, "max_steps=4")
    assert second.startswith("demo: resumed from its checkpoint at step 2, finished:"), second
    assert steps_logged(tmp_path / "run") == [1, 2, 3, 4]
    third = demo(tmp_path, "max_steps=4")
    assert third.startswith("demo: a new run, finished:"), third
    assert steps_logged(tmp_path / "run") == [1, 2, 3, 4]
