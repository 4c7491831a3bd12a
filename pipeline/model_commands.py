"""Using a trained model: `pipeline sample | reconstruct | interpolate | attribute-vector`, each writing
a PNG grid, from a weights folder: a checkpoint (OUTPUT/checkpoints/latest) or what `pipeline export`
wrote from one (<network>.safetensors and config.json).

Loading uses safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline import grids
from pipeline.plugin import ImageInfo, PluginError, load_plugin_class
from shards.errors import UserError
from shards.random_access import SplitDataset
from shards.reader import open_split


def load_model(folder: Path):
    """(plugin, networks in eval mode) from a weights folder."""
    description_path = folder / "config.json"
    try:
        description = json.loads(description_path.read_text())
        plugin_name, image = description["plugin"], description["image"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{description_path}: not a weights folder's config.json ({error})") from None
    plugin = load_plugin_class(plugin_name)(description.get("model", {}), ImageInfo(image["size"], image["channels"]))
    networks = torch.nn.ModuleDict(plugin.build_networks())
    for name, network in networks.items():
        path = folder / f"{name}.safetensors"
        try:
            state = load_file(str(path))
        except (OSError, SafetensorError) as error:
            raise UserError(f"{path}: cannot read the {plugin_name} {name}'s weights ({error})") from None
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
            raise UserError(f"{path}: does not fit the {plugin_name} {name} of config.json ({first})") from None
    return plugin, networks.eval()


def first_images(shards: Path, split: str, count: int, label: int | None = None, exclude: int | None = None):
    """The split's first `count` images, optionally only those with (or without) a label index."""
    dataset = SplitDataset(open_split(shards, split))
    images = []
    for index in range(len(dataset)):
        image, image_label = dataset[index]
        if (label is None or image_label == label) and (exclude is None or image_label != exclude):
            images.append(image)
            if len(images) == count:
                break
    if not images:
        raise UserError(f"no matching images in {shards} ({split})")
    return torch.stack(images)


def _codec(plugin, command: str):
    if not (hasattr(plugin, "encode") and hasattr(plugin, "decode")):
        raise PluginError(f"{command}: this plugin has no encode/decode (see pipeline/plugin.py)")
    return plugin.encode, plugin.decode


@torch.no_grad()
def sample(args: argparse.Namespace) -> int:
    plugin, networks = load_model(args.weights)
    images = plugin.sample(networks, args.count, torch.Generator().manual_seed(args.seed))
    grids.save(grids.grid(images), args.out)
    return 0


@torch.no_grad()
def reconstruct(args: argparse.Namespace) -> int:
    plugin, networks = load_model(args.weights)
    inputs = first_images(args.shards, args.split, args.count)
    grids.save(grids.pairs_grid(inputs, plugin.reconstruct(networks, inputs)), args.out)
    return 0


@torch.no_grad()
def interpolate(args: argparse.Namespace) -> int:
    """Each row: image A's code to image B's, in `steps` equal steps (both ends included)."""
    plugin, networks = load_model(args.weights)
    encode, decode = _codec(plugin, "interpolate")
    images = first_images(args.shards, args.split, 2 * args.rows)
    if len(images) < 2:
        raise UserError("interpolate needs at least two images")
    codes = encode(networks, images[: len(images) // 2 * 2])
    starts, ends = codes[0::2], codes[1::2]
    weights = torch.linspace(0, 1, args.steps)
    rows = [
        decode(networks, torch.stack([(1 - w) * a + w * b for w in weights])) for a, b in zip(starts, ends, strict=True)
    ]
    grids.save(grids.grid(torch.cat(rows), columns=args.steps), args.out)
    return 0


@torch.no_grad()
def attribute_vector(args: argparse.Namespace) -> int:
    """The paper's visual attribute vector: mean code with the label minus mean code without, added to
    images without it. Columns: input, its reconstruction, reconstruction + vector."""
    plugin, networks = load_model(args.weights)
    encode, decode = _codec(plugin, "attribute-vector")
    labels = open_split(args.shards, args.split).labels or ()
    if args.label not in labels:
        raise UserError(f"label {args.label!r} is not in {args.shards} (labels: {', '.join(labels) or 'none'})")
    index = labels.index(args.label)
    with_label = encode(networks, first_images(args.shards, args.split, args.samples, label=index))
    without = encode(networks, first_images(args.shards, args.split, args.samples, exclude=index))
    vector = with_label.mean(0) - without.mean(0)
    tests = first_images(args.shards, args.test_split, args.count, exclude=index)
    codes = encode(networks, tests)
    columns = [tests, decode(networks, codes), decode(networks, codes + args.scale * vector)]
    grids.save(grids.grid(torch.stack(columns, dim=1).flatten(0, 1), columns=3), args.out)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    def command(name: str, handler, help_text: str, data: bool = True) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text, description=help_text)
        parser.add_argument(
            "weights", type=Path, metavar="WEIGHTS", help="a checkpoint (OUTPUT/checkpoints/latest) or an export"
        )
        parser.add_argument("out", type=Path, metavar="OUT.png")
        if data:
            parser.add_argument("--shards", type=Path, required=True, help="a shards folder to take images from")
            parser.add_argument("--split", default="val", choices=("train", "val"))
        parser.set_defaults(handler=handler)
        return parser

    command("sample", sample, "a grid of samples from the prior", data=False).add_argument(
        "--count", type=int, default=64
    )
    commands.choices["sample"].add_argument("--seed", type=int, default=0)
    command("reconstruct", reconstruct, "inputs beside their reconstructions").add_argument(
        "--count", type=int, default=32
    )
    parser = command("interpolate", interpolate, "decoded interpolations between pairs of images' codes")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser = command(
        "attribute-vector",
        attribute_vector,
        "add a label's attribute vector (mean code with it minus without) to images' codes",
    )
    parser.add_argument("--label", required=True, help="a label name of the shards (`shards inspect`)")
    parser.add_argument("--samples", type=int, default=500, help="images with / without the label to average")
    parser.add_argument("--test-split", default="val", choices=("train", "val"))
    parser.add_argument("--count", type=int, default=8, help="test images (rows)")
    parser.add_argument("--scale", type=float, default=1.0)
