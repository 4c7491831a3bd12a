"""`eval.every`: what `pipeline evaluate` measures, during training, with every rank doing its share.

The held-out images are cut into batches of `eval.batch_size` as `pipeline evaluate` cuts them; rank r
extracts the features of batches r, r + W, r + 2W, ... (the slow part), of its images, their
reconstructions and the prior samples (every rank draws every batch of samples: they are one generator's
stream, the one `pipeline evaluate --seed` draws). Rank 0 gathers the batches, puts them back in order
and computes FID, KID, pixel MSE, feature distance, PSNR and SSIM (MS-SSIM) with `pipeline evaluate`'s
own functions, so the numbers equal what it reports for a checkpoint of the same step (tested on 2 ranks). The images'
features are measured once per run and kept: they depend only on the shards, split, count and extractor.
The networks evaluated are those `pipeline evaluate` takes from the step's checkpoint: the EMA weights
when the run keeps them, batch norm statistics averaged over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from pipeline.config.sections import RunConfig
from pipeline.data.stream import CenterCropped
from pipeline.errors import ConfigError
from pipeline.evaluation.features import FeatureExtractor, load_extractor
from pipeline.evaluation.passes import (
    reconstruction_parts,
    reconstruction_pass,
    sample_features,
    sample_parts,
    set_distances,
)
from pipeline.plugin import ModelPlugin, capabilities
from shards.read.random_access import SplitDataset
from shards.read.reader import ShardSplit, open_split


def nothing(_: int) -> None:
    """No progress bar: the run's own bar is showing."""


def held_out_split(config: RunConfig) -> ShardSplit:
    """`eval.split` of the run's shards, checked to hold `eval.count` images."""
    split = open_split(config.data.shards, config.eval.split, config.data.remote_access())
    if config.eval.count > split.count:
        raise ConfigError(
            f"eval.count: {config.eval.count} is more than the {split.count} images of {split.location} "
            f"({split.split}); lower it"
        )
    return split


@dataclass(frozen=True)
class HeldOut:
    """What evaluation during training measures against: the held-out images and the feature extractor."""

    split: ShardSplit
    extractor: FeatureExtractor


def prepare(config: RunConfig, plugin: ModelPlugin) -> HeldOut | None:
    """What a run with `eval.every` needs, checked and loaded before it starts (None without eval.every):
    a plugin that can sample or reconstruct, the held-out images, the extractor."""
    if config.eval.every is None:
        return None
    if not capabilities(plugin) & {"sample", "reconstruct"}:
        raise ConfigError(f"eval.every: the {config.plugin} plugin can neither sample nor reconstruct")
    return HeldOut(held_out_split(config), load_extractor(config.eval.extractor, config.eval.resolution))


class TrainingEvaluation:
    def __init__(self, config: RunConfig, accelerator: Accelerator, held_out: HeldOut) -> None:
        self.config, self.accelerator = config.eval, accelerator
        self.dataset = SplitDataset(held_out.split)
        if config.data.random_crop is not None:  # the model sees crops: measure it on the middle ones
            self.dataset = CenterCropped(self.dataset, config.data.random_crop)
        self.extractor = replace(held_out.extractor, module=held_out.extractor.module.to(accelerator.device))
        self.image_features: dict[int, torch.Tensor] | None = None  # every batch's, once measured

    def owned(self, index: int) -> bool:
        return index % self.accelerator.num_processes == self.accelerator.process_index

    @torch.no_grad()
    def run(self, plugin: ModelPlugin, networks: torch.nn.ModuleDict) -> dict[str, float]:
        """eval/<metric>s on rank 0 (an empty mapping elsewhere). A collective; `networks` in eval mode."""
        config, can = self.config, capabilities(plugin)
        known = self.image_features
        parts, _ = reconstruction_parts(
            plugin, networks, self.dataset, self.extractor, config.count, config.batch_size, nothing, self.owned, known
        )
        samples = {}
        if "sample" in can:
            samples, _ = sample_parts(
                plugin, networks, self.extractor, config.count, config.batch_size, config.seed, nothing, self.owned
            )
        gathered = gather_object([(parts, samples)])
        parts = {index: part for rank_parts, _ in gathered for index, part in rank_parts.items()}
        samples = {index: features for _, rank_samples in gathered for index, features in rank_samples.items()}
        self.image_features = {index: part["image_features"] for index, part in parts.items()}
        if not self.accelerator.is_main_process:
            return {}
        measured = reconstruction_pass(parts, [])  # pipeline evaluate's own figures of the batches
        images = measured.image_features
        settings = (config.kid_subset_size, config.kid_subsets, config.seed)
        metrics = {}
        if samples:
            distances, _ = set_distances(images, sample_features(samples), *settings)
            metrics.update({"eval/samples_fid": distances["frechet_distance"], "eval/samples_kid": distances["kid"]})
        if measured.reconstruction_features is not None:
            distances, _ = set_distances(images, measured.reconstruction_features, *settings)
            metrics.update(
                {
                    "eval/reconstructions_fid": distances["frechet_distance"],
                    "eval/reconstructions_kid": distances["kid"],
                    "eval/pixel_mse": measured.pixel_mse,
                    "eval/feature_distance": measured.feature_distance,
                    **{f"eval/{name}": value for name, value in measured.quality.items() if value is not None},
                }
            )
        return metrics
