"""Unreadable samples change an update exactly as leaving them out would, checked by the weights.

Samples are damaged after the build where the epoch order puts them in chosen micro-batches: one with all
its samples unreadable (its rank's gradient is zero, yet it counts in the average over ranks x micro-steps)
and others with readable samples beside unreadable ones (every readable one trains). Two ranks under ZeRO-2
train the `linear` plugin with SGD; the weights must equal plain PyTorch's, in float64, trained on exactly
the readable samples of the same micro-batches."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from test_checkpoints import assert_ok
from test_faults import overwrite_image
from trainer_helpers import PLUGIN_FIXTURE, build_small_shards, launch, metrics, weights, write_config

from pipeline.data.stream import StreamLayout, epoch_order
from pipeline.plugin import ImageInfo
from shards.read.random_access import SampleError, SplitDataset
from shards.read.reader import open_split

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')

SEED, RANKS, MICRO_STEPS, BATCH, STEPS = 7, 2, 2, 3, 3
# SGD rates that move each network by about 15% of its weights in 3 steps: at the plugin's defaults (0.05,
# 0.02) the decoder moves by 0.07%, and float32 rounding of its weights is already 6e-5 of that
RATES = {"encoder": 0.5, "decoder": 5.0}
# (global micro-step, rank): positions in that rank's micro-batch of BATCH samples made unreadable
DAMAGED = {
    (0, 0): (0, 1, 2),  # every sample: a zero gradient in step 1's average
    (0, 1): (1,),  # one bad sample between two readable ones
    (3, 1): (0, 1, 2),  # every sample, on the other rank, in step 2's second micro-step
    (4, 0): (0, 2),  # one readable sample left between two bad ones
}


def rank_micro_batches(layout: StreamLayout, count: int) -> list[list[list[int]]]:
    """The sample indices of each of the first `count` global micro-steps, per rank (pipeline/data/stream.py's
    contract: rank r takes the r-th slice of each global micro-batch of the epoch order)."""
    batches = []
    for micro_step in range(count):
        epoch, in_epoch = divmod(micro_step, layout.steps_per_epoch)
        order = list(epoch_order(layout, epoch))[in_epoch * layout.global_batch :]
        batches.append([order[rank * BATCH : (rank + 1) * BATCH] for rank in range(RANKS)])
    return batches


def damage(shards: Path, indices: set[int]) -> None:
    """Overwrite each sample's image with zeros, then check that the reader finds exactly these unreadable."""
    split = open_split(shards)
    for index in indices:
        shard, position = SplitDataset(split).locate(index)
        overwrite_image(shards / split.shards[shard]["name"], position)
    dataset, unreadable = SplitDataset(split), set()  # a fresh one: it opens and indexes each shard once
    for index in range(len(dataset)):
        try:
            dataset[index]
        except SampleError:
            unreadable.add(index)
    assert unreadable == indices


def reference_weights(plugin, initial: torch.nn.ModuleDict, dataset, batches, unreadable) -> torch.nn.ModuleDict:
    """Plain PyTorch in float64: each micro-batch's mean loss over its readable samples, gradients averaged
    over ranks x micro-steps (a micro-batch with none readable adds nothing but still counts), SGD."""
    networks = copy.deepcopy(initial).double()
    for step in range(STEPS):
        networks.zero_grad(set_to_none=False)
        for per_rank in batches[step * MICRO_STEPS : (step + 1) * MICRO_STEPS]:
            for indices in per_rank:
                readable = [index for index in indices if index not in unreadable]
                if readable:
                    images = torch.stack([dataset[index][0] for index in readable]).double()
                    (plugin.loss(networks, images) / (RANKS * MICRO_STEPS)).backward()
        with torch.no_grad():
            for name, network in networks.items():
                for parameter in network.parameters():
                    parameter -= RATES[name] * parameter.grad
    return networks


def flat(tensors) -> torch.Tensor:
    return torch.cat([tensor.detach().double().flatten() for tensor in tensors])


def test_unreadable_samples_train_as_if_left_out_of_their_micro_batches(tmp_path: Path) -> None:
    shards = build_small_shards(tmp_path / "data")  # 40 samples: 7,7,7,7,7,5
    split = open_split(shards)
    layout = StreamLayout(tuple(s["count"] for s in split.shards), SEED, 8, world_size=RANKS, batch_size=BATCH)
    batches = rank_micro_batches(layout, STEPS * MICRO_STEPS)
    unreadable = {batches[micro][rank][at] for (micro, rank), positions in DAMAGED.items() for at in positions}
    damage(shards, unreadable)

    config = write_config(
        tmp_path / "run.yaml",
        shards,
        tmp_path / "run",
        data={"shards": str(shards), "batch_size": BATCH, "workers": 1},
        max_steps=STEPS,
        gradient_accumulation_steps=MICRO_STEPS,
        seed=SEED,
        optimizer={name: {"lr": rate} for name, rate in RATES.items()},
    )
    assert_ok(launch(config))
    assert metrics(tmp_path / "run")[-1]["bad_samples"] == len(unreadable) == 9

    sys.path.insert(0, str(PLUGIN_FIXTURE))
    from linear_plugin import LinearAutoencoder

    plugin = LinearAutoencoder({"hidden": 4}, ImageInfo(split.image["size"], split.image["channels"]))
    set_seed(SEED)
    initial = torch.nn.ModuleDict(plugin.build_networks())  # what every rank started from
    expected = reference_weights(plugin, initial, SplitDataset(open_split(shards)), batches, unreadable)
    produced = weights(tmp_path / "run")
    for name, network in expected.items():
        keys = [key for key, _ in network.named_parameters()]
        update = flat(network.parameters()) - flat(initial[name].parameters())
        error = flat(produced[name][key] for key in keys) - flat(network.parameters())
        relative = float(error.norm() / update.norm())  # of the update: the weights themselves hide it
        print(f"{name}: error / update = {relative:.2e}")
        assert relative < 1e-5, (name, relative)
