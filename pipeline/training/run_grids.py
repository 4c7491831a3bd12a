"""The run's image grids (OUTPUT/samples/step-N-{samples,reconstructions}.png, and the trackers): prior
samples from the run's seed, and the same inputs beside their reconstructions at every step drawn."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from pipeline import grids
from pipeline.engine import trackers
from pipeline.plugin import ModelPlugin, capabilities
from shards.errors import UserError
from shards.read.random_access import SplitDataset, first_images
from shards.read.reader import ShardSplit


def grid_inputs(split: ShardSplit, count: int) -> torch.Tensor:
    """The same images for every reconstruction grid of a run: the split's first readable samples
    (unreadable ones are reported by the training stream)."""
    dataset = SplitDataset(split)
    images = [image for image, _ in first_images(dataset, count, skip_unreadable=True)]
    dataset.close()  # a remote shard held open here could never leave the cache
    if not images:
        raise UserError(f"{split.location}: no sample of split {split.split!r} is readable")
    return torch.stack(images)


@torch.no_grad()
def draw_grids(
    plugin: ModelPlugin,
    networks: torch.nn.ModuleDict,
    inputs: torch.Tensor,
    accelerator: Accelerator,
    seed: int,
    count: int,
    step: int,
    output_dir: Path,
) -> None:
    """count prior samples from `seed`, and `inputs` beside their reconstructions. Every rank draws (batch
    norm statistics averaged collectively before); rank 0 writes."""
    can, drawn = capabilities(plugin), {}
    dtype = next(networks.parameters()).dtype
    networks.eval()
    try:
        if "sample" in can:
            generator = torch.Generator().manual_seed(seed)
            samples = plugin.sample(networks, count, generator).float().cpu()
            drawn["samples"] = grids.grid(samples)
        if "reconstruct" in can:
            reconstructions = plugin.reconstruct(networks, inputs.to(accelerator.device, dtype)).float().cpu()
            drawn["reconstructions"] = grids.pairs_grid(inputs, reconstructions)
    finally:
        networks.train()
    if accelerator.is_main_process:
        for kind, image in drawn.items():
            path = output_dir / "samples" / f"step-{step:08d}-{kind}.png"
            grids.save(image, path)
            trackers.log_grid(accelerator, kind, image, path, step)
