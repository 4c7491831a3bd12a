"""Train a model plugin on shards.

accelerate launch [--config_file launch/accelerate/...] -m pipeline.train --config FILE [key.sub=value ...]
python -m pipeline.train --config FILE [...]        # one process
pipeline train --config FILE [...]                  # the same
"""

from __future__ import annotations

import argparse
import sys

import torch

from pipeline.config import ConfigError, load_config
from pipeline.plugin import ImageInfo, load_plugin_class
from shards.errors import UserError
from shards.reader import open_split


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="the run's YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")


def check_optimizer_networks(config, networks: dict) -> None:
    unknown = sorted(set(config.optimizer.model_extra or {}) - set(networks))
    if unknown:
        raise ConfigError(f"optimizer.{unknown[0]}: no such network (this plugin has: {', '.join(networks)})")


def run(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked here, before a process group or engine exists.
    try:
        config = load_config(args.config, args.overrides)
        plugin_class = load_plugin_class(config.plugin)
        split = open_split(config.data.shards, config.data.split)
        plugin = plugin_class(config.model, ImageInfo(split.image["size"], split.image["channels"]))
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        networks = plugin.build_networks()
        check_optimizer_networks(config, networks)
    except UserError as error:
        print(f"pipeline train: error: {error}", file=sys.stderr)
        return 2
    from pipeline.trainer import Trainer  # heavy (DeepSpeed, accelerate): only once the config is sound

    try:
        Trainer(config, plugin, split, networks).train()
    except UserError as error:
        print(f"pipeline train: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipeline.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
