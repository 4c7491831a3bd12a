"""Train a model plugin on shards.

accelerate launch [--config_file launch/accelerate/...] -m pipeline.train --config FILE [key.sub=value ...]
python -m pipeline.train --config FILE [...]        # one process
pipeline train --config FILE [...]                  # the same
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import NoReturn

import torch

from pipeline.checkpoint import check_plugin, check_shapes, find_resume
from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.engine import resolve_precision
from pipeline.plugin import ImageInfo, PluginError, load_plugin_class
from shards.errors import UserError
from shards.reader import ShardSplit, open_split


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="the run's YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")


def check_optimizer_networks(config: RunConfig, networks: dict) -> None:
    unknown = sorted(set(config.optimizer.model_extra or {}) - set(networks))
    if unknown:
        raise ConfigError(f"optimizer.{unknown[0]}: no such network (this plugin has: {', '.join(networks)})")


def check_one_global_batch(config: RunConfig, split: ShardSplit) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if split.count < world_size * config.data.batch_size:
        raise ConfigError(
            f"data.batch_size: {split.count} samples in {split.root} ({split.split}) are fewer than one global "
            f"micro-batch of {world_size} ranks x {config.data.batch_size}"
        )


def prepare_output_dir(output_dir: Path, resuming: bool, resume: str) -> None:
    if (output_dir / "metrics.jsonl").exists() and not resuming:
        if resume == "none":
            raise ConfigError(
                f"output_dir: {output_dir} already holds a run (metrics.jsonl) and resume=none; "
                "choose another output_dir, or resume=auto to continue it"
            )
        warn(f"{output_dir} holds a run without a usable checkpoint: starting it again from step 0")
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise ConfigError(f"output_dir: cannot write to {output_dir}: {error.strerror or error}") from None


def warn(message: str) -> None:
    """Every rank checks the same things; one of them says so."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pipeline train: warning: {message}", file=sys.stderr)


def find_checkpoint(config: RunConfig, split: ShardSplit) -> tuple[Path, dict] | None:
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


def make_plugin(plugin_class: type, config: RunConfig, split: ShardSplit):
    try:
        return plugin_class(config.model, ImageInfo(split.image["size"], split.image["channels"]))
    except (ValueError, TypeError) as error:  # a third-party plugin rejecting its options its own way
        raise PluginError(f"{config.plugin}: bad model options: {error}") from None


def run(args: argparse.Namespace) -> int:
    try:
        # Everything a user can get wrong is checked first, before a process group or engine exists.
        config = load_config(args.config, args.overrides)
        plugin_class = load_plugin_class(config.plugin)
        split = open_split(config.data.shards, config.data.split)
        resume = find_checkpoint(config, split)
        check_one_global_batch(config, split)
        resolve_precision(config.precision)
        plugin = make_plugin(plugin_class, config, split)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        networks = plugin.build_networks()
        check_optimizer_networks(config, networks)
        if resume is not None:
            check_shapes(resume[0], config.plugin, networks)
        # last: a rejected config leaves no folder behind
        prepare_output_dir(config.output_dir, resume is not None, config.resume)
        from pipeline.trainer import Trainer  # heavy (DeepSpeed): only once all that is sound

        Trainer(config, plugin, split, networks, resume).train()
    except UserError as error:
        print(f"pipeline train: error: {error}", file=sys.stderr)
        return leave_without_finalization(2) if torch.distributed.is_initialized() else 2
    except Exception as error:
        if not torch.distributed.is_initialized():
            raise
        # a fault (another rank died: "Connection reset by peer") or a bug: the traceback for the latter,
        # then one line, then out at once (waiting for a dead peer in the teardown would hang)
        traceback.print_exc()
        first_line = (str(error).splitlines() or [""])[0]
        print(
            f"pipeline train: error: rank {torch.distributed.get_rank()} stopped on {type(error).__name__}: "
            f"{first_line[:300]} (if another rank died first, its log says why; resume=auto continues from the "
            "last checkpoint)",
            file=sys.stderr,
        )
        leave_without_finalization(1)
    leave_without_finalization(0)


def leave_without_finalization(status: int) -> NoReturn:
    """Exit at once, skipping the interpreter's teardown. DeepSpeed keeps references to gloo process
    groups after they are destroyed, so their C++ objects die during interpreter finalization; in about
    one 2-rank CPU run in 50 a rank then aborted ("terminate called without an active exception") after a
    successful run, and the launcher reported a failure. After a failure, a teardown may also wait for a
    rank that is gone. Everything is written, fsynced and closed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipeline.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
