"""The `autoencoder-kl` plugin trained for real: on 1 and 2 ranks under ZeRO-0, 1 and 2 with accumulation,
SIGKILLed mid-step, resumed, and bit-identical to a run never stopped, with the discriminator starting
before the resume point and after it; it takes no optimizer step before disc_start, and its metrics are
logged from the step it starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_checkpoints import assert_bit_identical, assert_ok, latest, losses
from trainer_helpers import build_small_shards, launch, launch_killed, metrics, write_config

from pipeline import load_model

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


def config(tmp_path: Path, shards: Path, name: str, zero_stage: int, disc_start: int, crop: int | None) -> Path:
    return write_config(
        tmp_path / f"{name}.yaml",
        shards,
        tmp_path / name,
        plugin="autoencoder-kl",
        model={**MODEL, "disc_start": disc_start},
        optimizer={"lr": 1e-3},
        data={"shards": str(shards), "batch_size": 2, "workers": 1, "random_crop": crop, "hflip": crop is not None},
        deepspeed={"zero_stage": zero_stage},
        max_steps=7,
        checkpoint={"every": 2},
        sample_every=100,
    )


@pytest.mark.parametrize(
    ("processes", "zero_stage", "disc_start", "crop"),
    [(2, 2, 1, None), (2, 2, 3, None), (1, 0, 3, None), (2, 1, 1, None), (2, 2, 3, 12)],
)
def test_killed_mid_step_resumes_bit_identical(
    tmp_path: Path, processes: int, zero_stage: int, disc_start: int, crop: int | None
) -> None:
    """Killed after micro-batch 7 (mid-step 4; the last checkpoint is step 2), resumed to step 7. With
    data.random_crop (12 of the 16 px) and hflip: the crops too are the same after the resume, and the model
    is a 12 px one (config.json; load_model takes 12 px images)."""
    shards = build_small_shards(tmp_path / "data", images=40, size=16)
    straight = config(tmp_path, shards, "straight", zero_stage, disc_start, crop)
    assert_ok(launch(straight, processes=processes))
    interrupted = config(tmp_path, shards, "interrupted", zero_stage, disc_start, crop)
    killed = launch_killed(interrupted, "micro_step:7", processes=processes)
    assert killed.returncode != 0
    assert latest(tmp_path / "interrupted").name == "step-00000002"
    assert_ok(launch(interrupted, processes=processes))
    assert_bit_identical(latest(tmp_path / "straight"), latest(tmp_path / "interrupted"))
    assert losses(tmp_path / "interrupted") == losses(tmp_path / "straight")
    model = load_model(latest(tmp_path / "straight"))
    assert model.image.size == (crop or 16)
    assert model.reconstruct(torch.zeros(1, 1, crop or 16, crop or 16)).shape == (1, 1, crop or 16, crop or 16)

    records = {record["step"]: record for record in metrics(tmp_path / "straight")}
    for step, record in records.items():  # logged every step: steps 1..disc_start did not train it
        started = step > disc_start
        assert record["updated/discriminator"] == float(started), step
        assert ("d_weight" in record) == started and ("disc_loss" in record) == started, step
        assert record["nll_loss"] > 0 and record["kl_loss"] >= 0


def test_lpips_is_placed_frozen_never_saved_and_its_file_recorded(tmp_path: Path) -> None:
    """perceptual: lpips on 2 ranks: the run trains, its checkpoint holds no LPIPS tensor, and config.json
    records the sha256 of the weights file the loss read."""
    import hashlib

    from safetensors.torch import load_file
    from test_autoencoder_kl import lpips_file

    weights, _, _ = lpips_file(tmp_path, torch.Generator().manual_seed(0))
    shards = build_small_shards(tmp_path / "data", images=40, size=16)
    run = write_config(
        tmp_path / "run.yaml",
        shards,
        tmp_path / "run",
        plugin="autoencoder-kl",
        model={**MODEL, "disc_start": 1, "perceptual": "lpips", "lpips_weights": str(weights)},
        max_steps=2,
        sample_every=100,
    )
    assert_ok(launch(run))
    folder = latest(tmp_path / "run")
    described = json.loads((folder / "config.json").read_text())
    assert described["auxiliary"] == {"lpips": hashlib.sha256(weights.read_bytes()).hexdigest()}
    saved = [key for path in folder.glob("*.safetensors") for key in load_file(str(path))]
    assert saved and not any("lin0" in key or "slice1" in key for key in saved)
    assert all(record["rec_loss"] > 0 for record in metrics(tmp_path / "run"))
