"""The evaluation passes, shared by `pipeline evaluate` (pipeline/commands/evaluate.py) and evaluation during
training (in_training.py): reconstructions and prior samples of a model, in batches split over ranks, and
their features' distances to the real images'."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import grids
from pipeline.evaluation.feature_distances import KernelDistance, frechet_distance, kernel_distance
from pipeline.evaluation.features import FeatureExtractor
from pipeline.evaluation.image_quality import image_quality
from pipeline.plugin import ModelPlugin, capabilities
from shards.errors import UserError
from shards.read.random_access import SplitDataset, first_images
from shards.read.reader import open_split

SAMPLE_GRID = 64  # images in the samples grid
RECONSTRUCTION_GRID = 32  # input/reconstruction pairs in the reconstructions grid
QUALITY = ("psnr", "ssim", "ms_ssim")  # image_quality's figures


@dataclass(frozen=True)
class ReconstructionPass:
    image_features: np.ndarray
    # None when the plugin cannot reconstruct (then only the images' features were measured)
    reconstruction_features: np.ndarray | None
    pixel_mse: float | None
    feature_distance: float | None
    # mean over the images of each one's PSNR (dB), SSIM and MS-SSIM (None where the images are too small)
    quality: dict[str, float | None] | None
    grid: Image.Image | None  # the first RECONSTRUCTION_GRID inputs, each beside its reconstruction


@dataclass(frozen=True)
class SamplePass:
    features: np.ndarray
    grid: Image.Image  # the first SAMPLE_GRID samples


def held_out_images(shards: Path, split: str, count: int) -> SplitDataset:
    dataset = SplitDataset(open_split(shards, split))
    if count > len(dataset):
        raise UserError(f"--count {count} is more than the {len(dataset)} images of {shards} ({split}); lower --count")
    return dataset


def batches(total: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]


def every_batch(index: int) -> bool:
    return True


@torch.no_grad()
def reconstruction_parts(
    plugin: ModelPlugin,
    networks: torch.nn.ModuleDict,
    dataset: SplitDataset,
    extractor: FeatureExtractor,
    count: int,
    batch_size: int,
    advance: Callable[[int], None],
    owned: Callable[[int], bool] = every_batch,
    image_features: dict[int, torch.Tensor] | None = None,
) -> tuple[dict[int, dict[str, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """For each batch of the held-out images that `owned` names (by its index): the images' features (or
    those given in `image_features`, measured before), and with a plugin that can reconstruct, its
    reconstructions' features, squared errors and feature distances, on the CPU; and the first inputs
    beside their reconstructions, for the grid."""
    reconstructing = "reconstruct" in capabilities(plugin)
    device, dtype = next(networks.parameters()).device, next(networks.parameters()).dtype
    parts, shown = {}, []
    held_out = first_images(dataset, count)
    for index, indices in enumerate(batches(count, batch_size)):
        images = torch.stack([next(held_out)[0] for _ in indices])
        if not owned(index):
            continue
        images = images.to(device)
        known = image_features is not None
        part = {"image_features": image_features[index] if known else extractor.embed(images).cpu()}
        advance(len(indices))
        if reconstructing:
            reconstructions = plugin.reconstruct(networks, images.to(dtype)).float()  # bf16 networks in training
            part["reconstruction_features"] = extractor.embed(reconstructions).cpu()
            part["squared_errors"] = (reconstructions - images).pow(2).flatten(1).mean(1).cpu()
            part["distances"] = (part["image_features"] - part["reconstruction_features"]).norm(dim=1)
            for name, values in image_quality(reconstructions, images).items():
                if values is not None:
                    part[name] = values.cpu()
            if sum(len(inputs) for inputs, _ in shown) < RECONSTRUCTION_GRID:
                shown.append((images.cpu(), reconstructions.cpu()))
            advance(len(indices))
        parts[index] = part
    return parts, shown


def reconstruction_pass(
    parts: dict[int, dict[str, torch.Tensor]], shown: list[tuple[torch.Tensor, torch.Tensor]]
) -> ReconstructionPass:
    """Every batch's parts, in batch order, measured as one set."""
    ordered = [parts[index] for index in sorted(parts)]

    def joined(name: str) -> torch.Tensor:
        return torch.cat([part[name] for part in ordered])

    if "reconstruction_features" not in ordered[0]:
        return ReconstructionPass(joined("image_features").numpy(), None, None, None, None, None)
    grid = None
    if shown:
        inputs, outputs = (torch.cat(side)[:RECONSTRUCTION_GRID] for side in zip(*shown, strict=True))
        grid = grids.pairs_grid(inputs, outputs)
    return ReconstructionPass(
        joined("image_features").numpy(),
        joined("reconstruction_features").numpy(),
        joined("squared_errors").double().mean().item(),
        joined("distances").mean().item(),
        {name: joined(name).double().mean().item() if name in ordered[0] else None for name in QUALITY},
        grid,
    )


@torch.no_grad()
def sample_parts(
    plugin: ModelPlugin,
    networks: torch.nn.ModuleDict,
    extractor: FeatureExtractor,
    count: int,
    batch_size: int,
    seed: int,
    advance: Callable[[int], None],
    owned: Callable[[int], bool] = every_batch,
) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
    """The features of each batch of prior samples that `owned` names, on the CPU, and the first samples.
    Every batch is drawn, owned or not: the batches are one generator's stream."""
    generator = torch.Generator().manual_seed(seed)
    parts, shown = {}, []
    for index, indices in enumerate(batches(count, batch_size)):
        samples = plugin.sample(networks, len(indices), generator).float()
        if not owned(index):
            continue
        parts[index] = extractor.embed(samples).cpu()
        if sum(len(images) for images in shown) < SAMPLE_GRID:
            shown.append(samples.cpu())
        advance(len(indices))
    return parts, shown


def sample_features(parts: dict[int, torch.Tensor]) -> np.ndarray:
    """Every batch's sample features, in batch order."""
    return torch.cat([parts[index] for index in sorted(parts)]).numpy()


def set_distances(
    images: np.ndarray, generated: np.ndarray, kid_subset_size: int, kid_subsets: int, seed: int
) -> tuple[dict[str, float], KernelDistance]:
    kid = kernel_distance(images, generated, kid_subset_size, kid_subsets, seed)
    return {"frechet_distance": frechet_distance(images, generated), "kid": kid.mean, "kid_std": kid.std}, kid
