"""The run resolved once: every check a start-up makes, and every thing it builds, in one pass from the
config, the shards and the resume folder, before a process group or a DeepSpeed engine exists.

`resolve_run` returns a `ResolvedRun` that `pipeline train --dry-run` prints and the trainer takes as it
is: nothing here is built twice, nothing the trainer uses is rebuilt there. The order is the order of
the checks before it (the DeepSpeed file read with the config, the plugin, the shards, the resume
point, the precision and DeepSpeed config, the trackers), then the networks (seeded identically on every rank), the
optimizer each network gets, and the held-out set of evaluation during training.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from pipeline.checkpoints.checkpoint import check_plugin, check_shapes, find_resume
from pipeline.checkpoints.weights import load_auxiliary, load_initial_weights
from pipeline.config.sections import RunConfig
from pipeline.data.stream import model_image
from pipeline.engine.accelerator import resolve_precision
from pipeline.engine.deepspeed_config import build_deepspeed_config, load_user_config
from pipeline.engine.optimizer_plan import checked_optimizer_defaults, optimizer_plan
from pipeline.engine.trackers import chosen as chosen_trackers
from pipeline.errors import ConfigError, PluginError
from pipeline.evaluation import in_training
from pipeline.plugin import ImageInfo, ModelPlugin, check_required, load_plugin_class, resolved_options
from shards.read.reader import ShardSplit, open_split


@dataclass(frozen=True)
class ResolvedRun:
    config: RunConfig
    split: ShardSplit  # the training split (data.shards, data.split)
    plugin: ModelPlugin
    networks: dict[str, nn.Module]  # plugin.build_networks(), from config.seed: the same on every rank
    precision: str  # fp32 | bf16 | fp16, "auto" resolved for this machine
    optimizer: dict[str, Any]  # optimizer_plan: its name, shared settings, each network's lr and weight decay
    deepspeed: dict[str, Any]  # the DeepSpeed config the engine is built with
    held_out: in_training.HeldOut | None  # eval.every's images and extractor
    image: ImageInfo  # what the model sees (data.random_crop's crops, or the stored images)
    resume: tuple[Path, dict[str, Any]] | None  # the checkpoint folder and its trainer_state, or a fresh start
    auxiliary: dict[str, nn.Module] = field(default_factory=dict)  # frozen networks of the loss (LPIPS's VGG16)
    auxiliary_sha256: dict[str, str] = field(default_factory=dict)  # the files they came from

    def resolved_config(self) -> dict[str, Any]:
        """The run config as the run uses it: every default filled in, the plugin's options as validated,
        the optimizer each network gets. It is itself a valid config (OUTPUT/config.yaml, --dry-run)."""
        resolved = self.config.model_dump(mode="json")
        resolved["model"] = resolved_options(self.plugin, self.config.model)
        resolved["optimizer"] = self.optimizer
        return resolved

    def report(self) -> str:
        """What --dry-run prints: the resolved config and the DeepSpeed config built from it."""
        resume = self.resume
        start = f"resume from {resume[0]} (step {resume[1]['step']})" if resume else "start at step 0"
        document = {**self.resolved_config(), "deepspeed_config": self.deepspeed}
        return (
            f"# pipeline train --dry-run: every check passed; the run would {start}, precision {self.precision}\n"
            + yaml.safe_dump(document, sort_keys=False)
        ).rstrip("\n")


def resolve_run(
    config: RunConfig, config_file: str | Path, check_shards: bool, warn: Callable[[str], None]
) -> ResolvedRun:
    """check_shards: read every shard's size (the first rank; the others trust its check). warn: how a
    start-up warning is said (once, by the first rank)."""
    try:
        user_deepspeed = load_user_config(config)  # read as the YAML is: a file that does not do is the config's fault
    except ConfigError as error:
        raise ConfigError(f"{config_file}: not a valid config: {error}") from None
    plugin_class = load_plugin_class(config.plugin)
    split = open_split(config.data.shards, config.data.split, config.data.remote_access(), check_shards=check_shards)
    resume = find_checkpoint(config, split, warn)
    check_one_global_batch(config, split)
    precision = resolve_precision(config.precision)
    deepspeed = build_deepspeed_config(config, precision, user_deepspeed)  # what DeepSpeed refuses, or we cannot save
    chosen_trackers(config.log_with)  # each installed
    image = run_image(config, split)
    plugin = make_plugin(plugin_class, config, image)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    networks = plugin.build_networks()
    check_optimizer_networks(config, networks)
    held_out = in_training.prepare(config, plugin)
    defaults = checked_optimizer_defaults(config.plugin, plugin.optimizer_defaults(), list(networks))
    optimizer = optimizer_plan(config, defaults, list(networks))
    if resume is not None:
        check_shapes(resume[0], config.plugin, networks)
    else:
        load_initial_weights(plugin, networks, config.plugin)
    auxiliary, digests = load_auxiliary(plugin, config.plugin)
    return ResolvedRun(
        config, split, plugin, networks, precision, optimizer, deepspeed, held_out, image, resume, auxiliary, digests
    )


def check_optimizer_networks(config: RunConfig, networks: dict) -> None:
    unknown = sorted(set(config.optimizer.model_extra or {}) - set(networks))
    if unknown:
        raise ConfigError(f"optimizer.{unknown[0]}: no such network (this plugin has: {', '.join(networks)})")


def check_one_global_batch(config: RunConfig, split: ShardSplit) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if split.count < world_size * config.data.batch_size:
        raise ConfigError(
            f"data.batch_size: {split.count} samples in {split.location} ({split.split}) are fewer than one global "
            f"micro-batch of {world_size} ranks x {config.data.batch_size}"
        )


def find_checkpoint(config: RunConfig, split: ShardSplit, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    found = find_resume(config.output_dir, config.resume, warn)
    if found is None:
        return None
    folder, state = found
    check_plugin(folder, state, config.plugin)
    position = state["data"]
    saved_stream = (position["samples"], position["seed"], position["shuffle_shards"])
    if saved_stream != (split.count, config.seed, config.data.shuffle_shards):
        warn(
            f"{folder.name} was trained on another data stream (samples, seed, shuffle_shards = {saved_stream}); "
            f"continuing at epoch {position['epoch']}, sample {position['sample_in_epoch']} of this one"
        )
    return found


def run_image(config: RunConfig, split: ShardSplit) -> ImageInfo:
    """What the model sees: the stored images, or data.random_crop's crops of them."""
    stored = split.image["size"]
    if config.data.random_crop is not None and config.data.random_crop > stored:
        raise ConfigError(
            f"data.random_crop: {config.data.random_crop} is larger than the {stored} px images of {split.location}"
        )
    return ImageInfo(model_image(split, config.data)["size"], split.image["channels"], split.labels)


def make_plugin(plugin_class: type, config: RunConfig, image: ImageInfo) -> ModelPlugin:
    try:
        plugin = plugin_class(config.model, image)
    except (ValueError, TypeError) as error:  # a third-party plugin rejecting its options its own way
        raise PluginError(f"{config.plugin}: bad model options: {error}") from None
    check_required(plugin, config.plugin)
    return plugin
