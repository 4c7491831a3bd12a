"""Stress for a hang at exit: tests/helpers/stream_on_rank.py (2 ranks under torchrun, 2 DataLoader workers
each, reading the training stream) run N times in a row; a run that has not exited within --timeout is a
hang (it and everything it started are killed). The suite runs it a few times (tests/test_data_workers.py).

    .venv/bin/python scripts/stress_loader_exit.py --runs 200
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_data_stream import stream
from trainer_helpers import build_small_shards


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=120, help="seconds before a run counts as hung")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        shards = build_small_shards(Path(folder))
        hangs, failures, started = 0, 0, time.monotonic()
        for run in range(1, args.runs + 1):
            try:
                stream(shards, Path(folder) / f"report-{run}", start=0, steps=3, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                hangs += 1
            except AssertionError as error:
                failures += 1
                print(f"run {run}: failed: {error}", file=sys.stderr)
            if run % 10 == 0 or run == args.runs:
                elapsed = time.monotonic() - started
                print(f"{run} runs, {hangs} hung, {failures} failed, {elapsed:.0f} s", flush=True)
    return 1 if hangs or failures else 0


if __name__ == "__main__":
    sys.exit(main())
