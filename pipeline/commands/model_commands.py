"""Using a trained model: `pipeline sample | reconstruct | interpolate | attribute-vector`, each writing
a PNG grid, from a weights folder: a checkpoint (OUTPUT/checkpoints/latest) or what `pipeline export`
wrote from one (<network>.safetensors and config.json).

Loading uses safetensors only; nothing is unpickled. Every argument is checked before the model is
loaded, the output path included.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline import grids
from pipeline.checkpoints.weights import check_output_beside
from pipeline.model import WEIGHTS, Model, load_model
from pipeline.plugin import require
from shards.command_line import MAX_GRID, SHARD_FOLDER_HELP, bounded, one_line, seed, shard_folder
from shards.errors import UserError
from shards.read.random_access import SplitDataset, first_images
from shards.read.reader import open_split


def images_of(shards: Path, split: str, count: int, label: int | None = None, exclude: int | None = None):
    """The split's first `count` images (shards.read.random_access.first_images), stacked."""
    found = [image for image, _ in first_images(SplitDataset(open_split(shards, split)), count, label, exclude)]
    if not found:
        raise UserError(f"no matching images in {shards} ({split})")
    return torch.stack(found)


def save_grid(image, path: Path) -> None:
    try:
        grids.save(image, path)
    except OSError as error:  # checked before the work; a full disk remains possible
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    print(f"wrote {one_line(str(path))}")


def load_codec(args: argparse.Namespace) -> Model:
    """The model, for a command that encodes and decodes: one line first when the plugin cannot."""
    model = load_model(args.weights, args.which_weights)
    require(model.plugin, "encode")
    require(model.plugin, "decode")
    return model


@torch.no_grad()
def sample(args: argparse.Namespace) -> int:
    check_output_beside(args.out, args.weights)
    images = load_model(args.weights, args.which_weights).sample(args.count, args.seed)
    save_grid(grids.grid(images), args.out)
    return 0


@torch.no_grad()
def reconstruct(args: argparse.Namespace) -> int:
    check_output_beside(args.out, args.weights)
    model = load_model(args.weights, args.which_weights)
    require(model.plugin, "reconstruct")  # before the images: what the plugin cannot do is said first
    inputs = images_of(args.shards, args.split, args.count)
    save_grid(grids.pairs_grid(inputs, model.reconstruct(inputs)), args.out)
    return 0


@torch.no_grad()
def interpolate(args: argparse.Namespace) -> int:
    """Each row: image A's code to image B's, in `steps` equal steps (both ends included)."""
    check_output_beside(args.out, args.weights)
    model = load_codec(args)
    images = images_of(args.shards, args.split, 2 * args.rows)
    if len(images) < 2:
        raise UserError("interpolate needs at least two images")
    codes = model.encode(images[: len(images) // 2 * 2])
    starts, ends = codes[0::2], codes[1::2]
    weights = torch.linspace(0, 1, args.steps)
    rows = [
        model.decode(torch.stack([(1 - w) * a + w * b for w in weights])) for a, b in zip(starts, ends, strict=True)
    ]
    save_grid(grids.grid(torch.cat(rows), columns=args.steps), args.out)
    return 0


@torch.no_grad()
def attribute_vector(args: argparse.Namespace) -> int:
    """The paper's visual attribute vector: mean code with the label minus mean code without, added to
    images without it. Columns: input, its reconstruction, reconstruction + vector."""
    check_output_beside(args.out, args.weights)
    model = load_codec(args)
    labels = open_split(args.shards, args.split).labels or ()
    if args.label not in labels:
        raise UserError(f"label {args.label!r} is not in {args.shards} (labels: {', '.join(labels) or 'none'})")
    index = labels.index(args.label)
    with_label = model.encode(images_of(args.shards, args.split, args.samples, label=index))
    without = model.encode(images_of(args.shards, args.split, args.samples, exclude=index))
    vector = with_label.mean(0) - without.mean(0)
    tests = images_of(args.shards, args.test_split, args.count, exclude=index)
    codes = model.encode(tests)
    columns = [tests, model.decode(codes), model.decode(codes + args.scale * vector)]
    save_grid(grids.grid(torch.stack(columns, dim=1).flatten(0, 1), columns=3), args.out)
    return 0


def add_weights_choice(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        dest="which_weights",
        choices=WEIGHTS,
        help="EMA weights (a run with ema.decay saves them) or raw ones (default: EMA when the folder has them)",
    )


def add_commands(commands: argparse._SubParsersAction) -> None:
    def command(name: str, handler, help_text: str, data: bool = True) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text, description=help_text)
        parser.add_argument(
            "weights", type=Path, metavar="WEIGHTS", help="a checkpoint (OUTPUT/checkpoints/latest) or an export"
        )
        parser.add_argument("out", type=Path, metavar="OUT.png", help="the PNG to write (missing folders are made)")
        add_weights_choice(parser)
        if data:
            parser.add_argument(
                "--shards", type=shard_folder, required=True, help=f"images to take: {SHARD_FOLDER_HELP}"
            )
            parser.add_argument("--split", default="val", choices=("train", "val"))
        parser.set_defaults(handler=handler)
        return parser

    images = bounded(int, 1, MAX_GRID)
    parser = command("sample", sample, "a grid of samples from the prior", data=False)
    parser.add_argument("--count", type=images, default=64, help=f"samples, 1 to {MAX_GRID} (default 64)")
    parser.add_argument("--seed", type=seed, default=0, help="the prior noise (default 0)")
    parser = command("reconstruct", reconstruct, "inputs beside their reconstructions")
    parser.add_argument("--count", type=images, default=32, help=f"inputs, 1 to {MAX_GRID} (default 32)")
    parser = command("interpolate", interpolate, "decoded interpolations between pairs of images' codes")
    parser.add_argument("--rows", type=bounded(int, 1, 256), default=8, help="pairs of images (default 8)")
    parser.add_argument(
        "--steps", type=bounded(int, 2, 256), default=8, help="images a row, both ends included (default 8)"
    )
    parser = command(
        "attribute-vector",
        attribute_vector,
        "add a label's attribute vector (mean code with it minus without) to images' codes",
    )
    parser.add_argument("--label", required=True, help="a label name of the shards (`shards inspect`)")
    parser.add_argument(
        "--samples", type=bounded(int, 1, 10**6), default=500, help="images with / without the label to average"
    )
    parser.add_argument("--test-split", default="val", choices=("train", "val"))
    parser.add_argument("--count", type=images, default=8, help="test images (rows)")
    parser.add_argument(
        "--scale", type=bounded(float, -1000.0, 1000.0), default=1.0, help="times the vector (default 1)"
    )
