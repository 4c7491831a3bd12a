"""The benchmarks cannot rot between the rare times they run: every bench script imports after the
README's set-up alone, and `bench/gpu.py --dry-run` runs each of its parts at toy sizes on CPU."""

from __future__ import annotations

import os
import re
import sys

import pytest
from conftest import REPO, run_process
from trainer_helpers import environment

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')

BENCH = REPO / "bench"


def test_every_bench_script_imports_after_the_readme_setup():
    """One process imports every script (their main() sits behind __name__ == "__main__"): a missing
    package, or a name one script takes from another that is gone, fails here."""
    scripts = sorted(path.stem for path in BENCH.glob("*.py"))
    assert {"gpu", "quality", "loader", "shards_build", "train_step", "checkpoint"} <= set(scripts)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('imported')"
    result = run_process(
        [sys.executable, "-c", code, *scripts], timeout=300, env={**environment(), "PYTHONPATH": f"{BENCH}:{REPO}"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("imported")


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[1:]}


def test_gpu_bench_dry_run_runs_every_part_on_cpu(tmp_path):
    cores = str(len(os.sched_getaffinity(0)))
    result = run_process(
        [sys.executable, str(BENCH / "gpu.py"), "--dry-run", "--out", str(tmp_path)],
        timeout=900,
        env={**environment(), "OMP_NUM_THREADS": cores},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = (tmp_path / "dry-run.md").read_text()
    assert "CPU (no GPU); torch " in report and "DeepSpeed " in report and "accelerate " in report
    rows = table_rows(report)
    step = rows["pipeline step, micro-batch 2"]
    assert float(step[0]) > 0 and re.fullmatch(r"\d+\.\d\d \(target >= 0\.95\)", step[1])
    fixed = rows["pipeline's fixed cost per step, micro-batch 2"]
    assert re.fullmatch(r"-?\d+\.\d\d ms", fixed[0])  # time per step less the direct update's
    assert float(step[2]) > 1  # GFLOP per image from the flop counter: the networks' convolutions
    compiled = rows["pipeline step, compile: true, micro-batch 2"]
    assert float(compiled[0]) > 0 and int(compiled[2].split()[0]) > 0  # dynamo compiled graphs
    assert float(rows["loop fed by shards, 1 workers"][0]) > 0
    saves = [cells for name, cells in rows.items() if name.startswith("checkpoint save (")]
    assert len(saves) == 1 and saves[0][0].endswith(" GB/s") and saves[0][1].endswith(" GB/s)")
    stalls = {name: cells for name, cells in rows.items() if name.startswith("checkpoint stall, ")}
    assert len(stalls) == 3 and all(re.fullmatch(r"\d+\.\d{3} s", cells[0]) for cells in stalls.values())
    assert rows["exact resume, fp32, determinism: true"][0] == "bit-identical"
    assert rows["exact resume, fp16, determinism: true"][0] == "not run: fp16 needs a GPU"
    assert "time limit" not in report
    assert "gpu.py` --dry-run" not in (REPO / "docs" / "benchmarks.md").read_text()  # a dry run never writes the docs
