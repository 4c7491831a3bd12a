"""The trainer's data stream on 2 real ranks with 2 DataLoader workers each, over uneven shards:
each sample once per epoch, the same step count on every rank, a deterministic shuffle, exact resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from trainer_helpers import build_small_shards, free_port, run_python

from shards.read.random_access import SplitDataset
from shards.read.reader import open_split, to_unit_range

BATCH = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_shards(tmp_path_factory.mktemp("stream"))  # 40 samples, shards of 7,7,7,7,7,5


def stream(shards: Path, report: Path, start: int, steps: int, timeout: float = 300) -> list[dict]:
    command = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "helpers" / "stream_on_rank.py"),
        str(shards),
        str(BATCH),
        "2",
        str(start),
        str(steps),
        str(report),
    ]
    result = run_python(*command, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(Path(f"{report}.{rank}").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_every_sample_once_per_epoch_on_uneven_shards_and_exact_resume(tmp_path: Path, shards: Path) -> None:
    pixels, images = SplitDataset(open_split(shards), pixels=True), SplitDataset(open_split(shards))
    everything = {hashlib.sha256(image.numpy().tobytes()).hexdigest()[:16] for image, _ in pixels}
    assert len(everything) == 40
    # the loader hands over uint8 pixels, which the trainer scales on its device: the same float32 values
    for (pixel, _), (image, _) in zip(pixels, images, strict=True):
        assert pixel.dtype == torch.uint8 and torch.equal(to_unit_range(pixel), image)
    ranks = stream(shards, tmp_path / "full", start=0, steps=12)
    steps_per_epoch = ranks[0]["steps_per_epoch"]
    assert steps_per_epoch == 40 // (2 * BATCH) == 6
    assert all(len(rank["seen"]) == 12 for rank in ranks)  # same number of steps on both ranks
    epochs = []
    for epoch in range(2):
        window = slice(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        samples = [s for rank in ranks for batch in rank["seen"][window] for s in batch]
        assert len(samples) == len(set(samples)) == 36  # no duplicates; 40 % 6 = 4 dropped
        assert set(samples) <= everything
        epochs.append([batch for rank in ranks for batch in rank["seen"][window]])
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    again = stream(shards, tmp_path / "again", start=0, steps=12)
    assert [r["seen"] for r in again] == [r["seen"] for r in ranks]  # deterministic from the seed
    resumed = stream(shards, tmp_path / "resumed", start=4, steps=8)
    assert [r["seen"] for r in resumed] == [r["seen"][4:] for r in ranks]  # exact position, across an epoch end


def test_hflip_mirrors_a_sample_by_seed_epoch_and_index_only(shards: Path) -> None:
    from pipeline.data.stream import StreamLayout, TrainingSamples, flipped

    split = SplitDataset(open_split(shards))
    samples = TrainingSamples(split, seed=3, hflip=True)
    decisions = {(epoch, index): flipped(3, epoch, index) for epoch in range(2) for index in range(len(split))}
    assert 0.3 < sum(decisions.values()) / len(decisions) < 0.7
    for (epoch, index), flip in decisions.items():
        image, _ = samples[epoch * len(split) + index]
        original, _ = split[index]
        assert torch.equal(image, original.flip(-1) if flip else original)
    assert [decisions[0, i] for i in range(40)] != [decisions[1, i] for i in range(40)]  # new flips each epoch
    assert StreamLayout((40,), 3, 1, 1, 4).steps_per_epoch == 10


def test_random_crop_takes_a_window_by_seed_epoch_and_index_only(shards: Path) -> None:
    """data.random_crop: each sample's N x N window is placed by a hash of (seed, epoch, index), computed
    here from its definition (blake2b of "crop:seed:epoch:index", two little-endian 32-bit words modulo the
    positions), then flipped when hflip says so; every position is reachable, and the window moves each
    epoch. Grids and evaluation see the middle window."""
    from pipeline.data.stream import TrainingSamples, center_crop, flipped

    split = SplitDataset(open_split(shards))
    stored = split[0][0].shape[-1]
    size = stored - 3  # 4 positions a side
    samples = TrainingSamples(split, seed=5, hflip=True, crop=size)
    corners = set()
    for epoch in range(2):
        for index in range(len(split)):
            digest = hashlib.blake2b(f"crop:5:{epoch}:{index}".encode(), digest_size=8).digest()
            top, left = (int.from_bytes(part, "little") % 4 for part in (digest[:4], digest[4:]))
            corners.add((epoch, top, left))
            original, _ = split[index]
            window = original[:, top : top + size, left : left + size]
            image, _ = samples[epoch * len(split) + index]
            assert torch.equal(image, window.flip(-1) if flipped(5, epoch, index) else window)
            assert image.shape == (original.shape[0], size, size) and image.is_contiguous()
    assert {(top, left) for _, top, left in corners} == {(row, column) for row in range(4) for column in range(4)}
    middle = center_crop(split[0][0], size)
    assert torch.equal(middle, split[0][0][:, 1 : 1 + size, 1 : 1 + size])
