"""faults.on_diverge: rollback, for real: 2 ranks x 2 micro-batches under ZeRO-2, the linear test plugin
with input noise (each rank's RNG matters) whose loss turns NaN at one micro-batch of the data, found by
its mean pixel (a sample that diverges, wherever it comes in the order): the run rolls back to its last
checkpoint, skips the data from there to the divergence and one step more, and finishes. Its final
weights equal bit for bit those of a run told to skip the same micro-steps from the start
(faults.skip_micro_steps); and a SIGKILL right after the rollback resumes to the same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_checkpoints import assert_bit_identical
from trainer_helpers import build_small_shards, launch, launch_killed, metrics, write_config

from pipeline.data.stream import StreamLayout, epoch_order
from pipeline.training import rollback
from shards.read.random_access import SplitDataset
from shards.read.reader import open_split

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')

RANKS, ACCUMULATION, BATCH, SEED = 2, 2, 2, 7
POISON = 6  # the global micro-step whose rank-0 micro-batch diverges: the 4th optimizer step
STEPS = 8


def rank0_batch_means(shards: Path, micro_steps: int) -> list[float]:
    """Rank 0's mean pixel at each global micro-step, as the trainer reads them (epoch after epoch)."""
    split = open_split(shards)
    counts = tuple(shard["count"] for shard in split.shards)
    layout = StreamLayout(counts, SEED, 8, world_size=RANKS, batch_size=BATCH)
    dataset, means = SplitDataset(split), []
    for micro_step in range(micro_steps):
        epoch, within = divmod(micro_step, layout.steps_per_epoch)
        order = list(epoch_order(layout, epoch))
        start = within * RANKS * BATCH
        means.append(float(torch.stack([dataset[i][0] for i in order[start : start + BATCH]]).double().mean()))
    return means


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_shards(tmp_path_factory.mktemp("rollback"), images=40, size=8)


def config(tmp_path: Path, shards: Path, name: str, **faults) -> Path:
    means = rank0_batch_means(shards, 40)
    poison = means[POISON]
    assert all(abs(mean - poison) > 1e-4 for step, mean in enumerate(means) if step != POISON), "not one batch"
    return write_config(
        tmp_path / f"{name}.yaml",
        shards,
        tmp_path / name,
        model={"hidden": 4, "noise": 0.1, "nonfinite": {"batch_mean": poison, "rank": 0}},
        max_steps=STEPS,
        gradient_accumulation_steps=ACCUMULATION,
        seed=SEED,
        checkpoint={"every": 2},
        faults={"max_skipped_steps_in_a_row": 1, **faults},
    )


ROLLBACK = {"on_diverge": "rollback", "rollback_skip_steps": 1}
# what the rollback records: back to step 2's checkpoint (micro-step 4), on from the divergence (the end of
# step 4, micro-step 8) plus 1 step (2 micro-steps)
SKIPPED = [4, 10]


def test_a_run_that_diverges_rolls_back_skips_and_equals_a_run_told_to_skip(tmp_path: Path, shards: Path) -> None:
    rolled = launch(config(tmp_path, shards, "rolled", **ROLLBACK))
    assert rolled.returncode == 0, rolled.stderr[-3000:]
    assert "step 4: diverged; rolled back to step-00000002" in rolled.stderr + rolled.stdout
    record = [json.loads(line) for line in (tmp_path / "rolled" / "rollbacks.jsonl").read_text().splitlines()]
    assert record == [{"diverged_at_step": 4, "to_step": 2, "from_micro_step": 4, "to_micro_step": 10}]
    logged = metrics(tmp_path / "rolled")
    assert [line["step"] for line in logged if "event" not in line] == list(range(1, STEPS + 1))
    assert [line for line in logged if "event" in line] == [{"step": 2, "event": "rollback", **record[0]}]
    state = json.loads((tmp_path / "rolled" / "checkpoints" / "latest" / "trainer_state.json").read_text())
    assert state["rollbacks"] == record and state["micro_step"] == SKIPPED[1] + 2 * (STEPS - 2)

    told = launch(config(tmp_path, shards, "told", skip_micro_steps=[SKIPPED]))
    assert told.returncode == 0, told.stderr[-3000:]
    assert "diverged" not in told.stderr
    assert_bit_identical(tmp_path / "rolled" / "checkpoints" / "latest", tmp_path / "told" / "checkpoints" / "latest")

    stopped = launch(config(tmp_path, shards, "stopped"))  # the default, on_diverge: stop
    assert stopped.returncode != 0  # 2 from every rank; plain accelerate launch reports 1
    assert "faults.on_diverge: rollback would go back to it" in stopped.stderr


def test_a_sigkill_right_after_the_rollback_resumes_to_the_same_weights(tmp_path: Path, shards: Path) -> None:
    run_config = config(tmp_path, shards, "killed", **ROLLBACK)
    killed = launch_killed(run_config, "rollback:1")
    assert killed.returncode != 0
    assert (tmp_path / "killed" / "rollbacks.jsonl").exists()
    assert not (tmp_path / "killed" / "checkpoints" / "step-00000004").exists()
    resumed = launch(run_config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "diverged" not in resumed.stderr  # the record's skip, taken at once: the bad batch is never read again
    told = launch(config(tmp_path, shards, "told", skip_micro_steps=[SKIPPED]))
    assert told.returncode == 0, told.stderr[-3000:]
    assert_bit_identical(tmp_path / "killed" / "checkpoints" / "latest", tmp_path / "told" / "checkpoints" / "latest")


def test_a_skip_that_is_not_whole_steps_is_one_line_at_start_up(tmp_path: Path, shards: Path) -> None:
    bad = launch(config(tmp_path, shards, "odd", skip_micro_steps=[[3, 10]]))
    assert bad.returncode != 0
    assert "faults.skip_micro_steps: [3, 10] must be FROM < TO, both multiples of gradient_accumulation_steps" in (
        bad.stderr
    )
    assert not (tmp_path / "odd").exists()


def test_a_loss_spike_rolls_back_until_max_rollbacks_then_stops(tmp_path: Path, shards: Path) -> None:
    """faults.spike_factor: the loss of optimizer step 105 made 1000 times larger on rank 0 (a finite spike:
    its update is taken), once the window holds 100 steps. Keyed on the step, it comes back after every
    rollback: the run rolls back twice (max_rollbacks 2), each recorded, then stops with one line."""
    run = write_config(
        tmp_path / "spike.yaml",
        shards,
        tmp_path / "spike",
        model={"hidden": 4, "nonfinite": {"steps": [104], "rank": 0, "kind": "spike"}},
        max_steps=110,
        gradient_accumulation_steps=ACCUMULATION,
        seed=SEED,
        log_every=50,
        sample_every=1000,
        checkpoint={"every": 102},
        faults={"on_diverge": "rollback", "spike_factor": 20, "max_rollbacks": 2},
    )
    result = launch(run)
    assert result.returncode != 0
    assert "step 105: loss" in result.stderr and "above faults.spike_factor" in result.stderr, result.stderr[-3000:]
    assert "faults.max_rollbacks reached" in result.stderr
    record = [json.loads(line) for line in (tmp_path / "spike" / "rollbacks.jsonl").read_text().splitlines()]
    assert [(line["diverged_at_step"], line["to_step"], line["from_micro_step"]) for line in record] == [
        (105, 102, 204),
        (105, 102, 204),
    ]
    assert record[0]["to_micro_step"] == 210 and record[1]["to_micro_step"] == 216  # each time further on


def test_a_rollback_goes_back_on_its_own_timeline_not_to_latest(tmp_path: Path, shards: Path) -> None:
    """A run resumed by path from step 2 of a folder whose `latest` is step 8 (the timeline it abandons)
    diverges at step 4, before it writes a checkpoint: it rolls back to step 2, where it came from, never
    forward to step 8; and it ends with the weights of the run told to skip."""
    told = config(tmp_path, shards, "told", skip_micro_steps=[SKIPPED])
    assert launch(told, "checkpoint.keep_last=10").returncode == 0  # step 2's checkpoint kept
    folder = tmp_path / "told"
    assert (folder / "checkpoints" / "latest").resolve().name == "step-00000008"
    reference = tmp_path / "reference"
    shutil.copytree(folder / "checkpoints" / "step-00000008", reference)
    again = config(tmp_path, shards, "told", **ROLLBACK)  # the same folder, no skip given: the poison is met
    result = launch(again, f"resume={folder / 'checkpoints' / 'step-00000002'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 4: diverged; rolled back to step-00000002" in result.stderr + result.stdout
    record = [json.loads(line) for line in (folder / "rollbacks.jsonl").read_text().splitlines()]
    assert record == [{"diverged_at_step": 4, "to_step": 2, "from_micro_step": 4, "to_micro_step": 10}]
    assert_bit_identical(reference, folder / "checkpoints" / "latest")


@pytest.mark.parametrize(("window", "loss", "spiked"), [(1.0, 25.0, True), (1.0, 15.0, False), (0.0, 1e9, False)])
def test_the_spike_watch_compares_with_the_median_of_a_full_window(window: float, loss: float, spiked: bool) -> None:
    """factor 20 over the last 100 losses; a window of zeros (a loss that can be zero) never calls a spike."""
    assert rollback.SpikeWatch(20.0, [1.0] * 99).spiked(1e12) is False  # 99 losses: the window is not full yet
    watch = rollback.SpikeWatch(20.0, [window] * rollback.SPIKE_WINDOW)
    assert watch.spiked(loss) is spiked
    assert rollback.SpikeWatch(None).spiked(1e30) is False


def test_no_checkpoint_of_its_own_before_the_divergence_stops_it_in_one_line(tmp_path: Path, shards: Path) -> None:
    """A folder holding another run's checkpoints (its `latest` at step 8) but no metrics.jsonl: a run with
    resume=none starts at step 0 beside them and diverges at step 4 before writing a checkpoint of its own.
    It must not roll back into the other run's checkpoints: it stops, saying why."""
    told = config(tmp_path, shards, "told", skip_micro_steps=[SKIPPED])
    assert launch(told).returncode == 0
    (tmp_path / "told" / "metrics.jsonl").unlink()
    result = launch(config(tmp_path, shards, "told", **ROLLBACK), "resume=none", "checkpoint.every=100")
    assert result.returncode != 0
    assert "rolling back is not possible (no checkpoint of this run before the divergence)" in result.stderr
    assert "Traceback (most recent call last)" not in result.stderr.split("pipeline train: error:")[0]
    assert not (tmp_path / "told" / "rollbacks.jsonl").exists()
