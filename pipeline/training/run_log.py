"""What a run leaves behind as it goes: metrics.jsonl (one JSON object per logged step, strict JSON: a
non-finite value, a NaN or infinite loss, is written as null), the accelerate trackers (TensorBoard when
installed), and rank 0's progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.progress import Progress, TextColumn

from pipeline.engine import deepspeed_internals as internals
from shards.progress import console, progress_bar


class RunLog:
    def __init__(self, output_dir: Path, accelerator, total_steps: int, first_step: int, images_seen: int) -> None:
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.total_steps = total_steps
        self.metrics_path = output_dir / "metrics.jsonl"
        self.progress: Progress | None = None
        if self.main:
            self.progress = progress_bar("steps")
            self.progress.columns = (*self.progress.columns, TextColumn("{task.fields[losses]}"))
            self.task = self.progress.add_task("training", total=total_steps, completed=first_step, losses="")
            self.progress.start()
        # a resumed run's first rate counts from the images it resumed at, not from 0
        self.last_time, self.last_images = time.perf_counter(), images_seen

    def log(self, step: int, images_seen: int, metrics: dict[str, float]) -> None:
        """metrics: already reduced across ranks; called on every rank, writes on rank 0."""
        now = time.perf_counter()
        rate = (images_seen - self.last_images) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_images = now, images_seen
        record = {"step": step, "images": images_seen, **metrics, "images_per_s": round(rate, 2)}
        self.accelerator.log({key: value for key, value in record.items() if key != "step"}, step=step)
        if not self.main:
            return
        with open(self.metrics_path, "a") as file:
            file.write(json_line(record) + "\n")
        losses = " ".join(f"{key} {value:.4g}" for key, value in list(metrics.items())[:4])
        self.progress.update(self.task, losses=losses)
        if not console.is_terminal:  # a log file (SLURM, CI) gets no live bar: give it a line per log step
            console.print(f"step {step}/{self.total_steps} images {images_seen} {rate:.1f} images/s {losses}")

    def evaluation(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        """eval.every's metrics (rank 0 has them) as a record of their own; called on every rank. The time
        they took is left out of the next images_per_s."""
        self.last_time += seconds
        if not self.main:
            return
        self.accelerator.log(metrics, step=step)
        with open(self.metrics_path, "a") as file:
            file.write(json_line({"step": step, **metrics, "eval_seconds": round(seconds, 2)}) + "\n")
        self.say(f"step {step}: " + " ".join(f"{key} {value:.4g}" for key, value in metrics.items()))

    def event(self, step: int, record: dict) -> None:
        """A record of something the run did at `step` (a rollback), on rank 0."""
        if self.main:
            with open(self.metrics_path, "a") as file:
                file.write(json_line({"step": step, **record}) + "\n")

    def advance(self, step: int) -> None:
        if self.progress:
            self.progress.update(self.task, completed=step)

    @staticmethod
    def drop_records_after(output_dir: Path, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: forget what the killed run logged for them."""
        path = output_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines(keepends=True) if _logged_step(line) <= step]
        temporary = path.with_suffix(".tmp")
        temporary.write_text("".join(kept))
        temporary.replace(path)

    def say(self, message: str) -> None:
        if self.progress:
            self.progress.console.print(f"pipeline train: {message}")

    def stop(self) -> None:
        if self.progress:
            self.progress.stop()


def json_line(record: dict) -> str:
    """Strict JSON, which any parser reads: Python's json would write NaN and Infinity, which are not JSON."""
    finite = {
        key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in record.items()
    }
    return json.dumps(finite, allow_nan=False)


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line torn by the kill


def record_rank(engine, networks, accelerator, precision: str, output_dir: Path) -> None:
    """ranks/rank-N.json: what this rank holds, to see ZeRO's partitioning (written after the first
    step, when the optimizer state exists)."""
    record = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "zero_stage": engine.zero_optimization_stage(),
        "parameters": sum(p.numel() for p in networks.parameters()),
        "optimizer_state_elements": internals.optimizer_state_elements(engine),
        "precision": precision,
        "device": str(accelerator.device),
    }
    folder = output_dir / "ranks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{record['rank']}.json").write_text(json.dumps(record, indent=2) + "\n")
