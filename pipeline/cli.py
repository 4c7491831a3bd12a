"""The `pipeline` command: train model plugins on shards, list the plugins, use trained models, evaluate
them, and plot a run's losses. Results go to stdout; progress and errors to stderr (a usage mistake is
one line and exit status 2, as for `shards`: shards/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from pipeline import train
from pipeline.checkpoints import checkpoint
from pipeline.commands import evaluate, lpips_weights, model_commands, plot
from pipeline.commands.diffusers_export import export_diffusers
from pipeline.model import WEIGHTS
from pipeline.plugin import describe, installed_plugins
from shards import __version__
from shards.command_line import (
    ArgumentParser,
    bounded,
    check_output_folder,
    one_line,
    output,
    report_error,
    shard_folder,
)
from shards.errors import UserError


def list_plugins(args: argparse.Namespace) -> int:
    table = Table(title="model plugins (entry point group pipeline.plugins)")
    for column in ("name", "class", "description"):
        table.add_column(column)
    for name, point in sorted(installed_plugins().items()):
        table.add_row(escape(name), escape(point.value), escape(describe(point)))  # third-party text: no markup
    output.print(table)
    return 0


def export(args: argparse.Namespace) -> int:
    check_output_folder(args.out)
    try:
        if args.format == "diffusers":
            options = (args.weights, args.scaling_factor, args.shards, args.split, args.count)
            written = export_diffusers(args.checkpoint, args.out, *options)
        else:
            written = checkpoint.export(args.checkpoint, args.out)
    except OSError as error:  # checked before the work; a full disk remains possible
        raise UserError(f"cannot export to {args.out}: {error.strerror or error}") from None
    names = ", ".join(path.name for path in written)
    print(f"exported {len(written)} files to {one_line(str(args.out))}: {one_line(names)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="pipeline", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pipeline {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    training = commands.add_parser(
        "train",
        help="train a plugin (same as python -m pipeline.train)",
        description=train.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_arguments(training)
    training.set_defaults(handler=train.run)
    plugins = commands.add_parser("plugins", help="list the installed model plugins")
    plugins.set_defaults(handler=list_plugins)
    exporting = commands.add_parser(
        "export",
        help="a checkpoint's weights as a folder that needs neither DeepSpeed nor the optimizer state",
        description="Copy a checkpoint's <network>.safetensors and config.json to OUT, after checking them "
        "against its trainer_state.json. `pipeline sample` and safetensors.torch.load_file read the result.",
    )
    exporting.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="OUTPUT/checkpoints/step-N or latest")
    exporting.add_argument("out", type=Path, metavar="OUT")
    exporting.add_argument(
        "--format",
        choices=("weights", "diffusers"),
        default="weights",
        help="weights: the checkpoint's weights folder; diffusers: an autoencoder-kl model as the folder "
        "diffusers.AutoencoderKL.from_pretrained loads (default weights)",
    )
    exporting.add_argument(
        "--weights", choices=WEIGHTS, default=None, help="diffusers: ema or raw (default: ema when the run kept them)"
    )
    exporting.add_argument(
        "--scaling-factor", type=bounded(float, 1e-12), default=None, help="diffusers: the latents' scaling_factor"
    )
    exporting.add_argument(
        "--shards", type=shard_folder, default=None, help="diffusers: measure scaling_factor on these shards' images"
    )
    exporting.add_argument("--split", choices=("train", "val"), default="train", help="diffusers: with --shards")
    exporting.add_argument(
        "--count", type=bounded(int, 2, 10**6), default=256, help="diffusers: images measured (default 256)"
    )
    exporting.set_defaults(handler=export)
    model_commands.add_commands(commands)
    evaluate.add_command(commands)
    plot.add_command(commands)
    lpips_weights.add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as error:
        return report_error(f"pipeline {args.command}", error)


if __name__ == "__main__":
    sys.exit(main())
