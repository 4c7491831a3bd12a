"""The `autoencoder-kl` plugin trained for real: on 1 and 2 ranks under ZeRO-0, 1 and 2 with accumulation,
SIGKILLed mid-step, resumed, and bit-identical to a run never stopped, with the discriminator starting
before the resume point and after it; it takes no optimizer step before disc_start, and its metrics are
logged from the step it starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_checkpoints import assert_bit_identical, assert_ok, latest, losses
from trainer_helpers import build_small_shards, launch, launch_killed, metrics, write_config

pytestmark = pytest.mark.slow

MODEL = {
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "disc_channels": 4,
    "disc_layers": 2,
    "kl_weight": 0.01,
    "perceptual": "discriminator",
    "perceptual_weight": 0.1,
}


def config(tmp_path: Path, shards: Path, name: str, zero_stage: int, disc_start: int) -> Path:
    return write_config(
        tmp_path / f"{name}.yaml",
        shards,
        tmp_path / name,
        plugin="autoencoder-kl",
        model={**MODEL, "disc_start": disc_start},
        optimizer={"lr": 1e-3},
        data={"shards": str(shards), "batch_size": 2, "workers": 1},
        deepspeed={"zero_stage": zero_stage},
        max_steps=7,
        checkpoint={"every": 2},
        sample_every=100,
    )


@pytest.mark.parametrize(("processes", "zero_stage", "disc_start"), [(2, 2, 1), (2, 2, 3), (1, 0, 3), (2, 1, 1)])
def test_killed_mid_step_resumes_bit_identical(
    tmp_path: Path, processes: int, zero_stage: int, disc_start: int
) -> None:
    """Killed after micro-batch 7 (mid-step 4; the last checkpoint is step 2), resumed to step 7."""
    shards = build_small_shards(tmp_path / "data", images=40, size=16)
    straight = config(tmp_path, shards, "straight", zero_stage, disc_start)
    assert_ok(launch(straight, processes=processes))
    interrupted = config(tmp_path, shards, "interrupted", zero_stage, disc_start)
    killed = launch_killed(interrupted, "micro_step:7", processes=processes)
    assert killed.returncode != 0
    assert latest(tmp_path / "interrupted").name == "step-00000002"
    assert_ok(launch(interrupted, processes=processes))
    assert_bit_identical(latest(tmp_path / "straight"), latest(tmp_path / "interrupted"))
    assert losses(tmp_path / "interrupted") == losses(tmp_path / "straight")

    records = {record["step"]: record for record in metrics(tmp_path / "straight")}
    for step, record in records.items():  # logged every step: steps 1..disc_start did not train it
        started = step > disc_start
        assert record["updated/discriminator"] == float(started), step
        assert ("d_weight" in record) == started and ("disc_loss" in record) == started, step
        assert record["nll_loss"] > 0 and record["kl_loss"] >= 0
