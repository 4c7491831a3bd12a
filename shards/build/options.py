"""What the shards are, as options of `shards build` and `shards plan` (whose parts and merge read them
back from the plan), and OUT checked against them before any work."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable
from decimal import Decimal, InvalidOperation
from pathlib import Path

from shards.build.imageops import CROPS, FORMATS, MODES, PIL_DEFAULT_MAX_PIXELS, ImageSpec
from shards.build.publish import publisher_for
from shards.build.work import BuildOptions
from shards.command_line import bounded, check_output_folder, quoted, seed
from shards.errors import UserError
from shards.format.manifest import MANIFEST_NAME, MAX_SHARD_BYTES
from shards.read.folder import ShardFolder
from shards.store.remote import StoreNotFound


def add_build_options(parser: argparse.ArgumentParser) -> None:
    """What the shards are: given to `shards build` or to `shards plan` (whose parts read it back)."""
    parser.add_argument(
        "--size", type=bounded(int, 1, 8192), default=64, help="side of the square output images (default 64)"
    )
    parser.add_argument(
        "--crop",
        choices=CROPS,
        default="center",
        help="center: largest centred square; none: squash the whole image; "
        "celeba: the paper's rows 40:188, cols 15:163 of aligned 178x218 images (default center)",
    )
    parser.add_argument(
        "--format", choices=sorted(FORMATS), default="png", help="image encoding in the shards (default png)"
    )
    parser.add_argument(
        "--quality", type=bounded(int, 1, 100), default=95, help="jpg/webp quality; webp 100 = lossless (default 95)"
    )
    parser.add_argument("--mode", choices=MODES, default="RGB", help="RGB or L (grayscale) output (default RGB)")
    parser.add_argument(
        "--labels",
        choices=("none", "folder"),
        default="none",
        help="folder: label = first sub-folder under SRC (a list file's 2nd column is always read)",
    )
    parser.add_argument(
        "--shard-size", type=bounded(int, 1, 10**9), default=1000, help="samples per shard (default 1000)"
    )
    parser.add_argument(
        "--shard-bytes", type=byte_size, default=None, help="also cap each shard's file size, e.g. 200MB (local builds)"
    )
    parser.add_argument(
        "--val-fraction",
        type=bounded(float, 0.0, 1.0),
        default=0.05,
        help="share of images in the val split, chosen by a hash of each key (default 0.05)",
    )
    parser.add_argument("--seed", type=seed, default=0, help="order of samples across shards (default 0)")
    parser.add_argument(
        "--max-pixels",
        type=bounded(int, 1, 2**40),
        default=PIL_DEFAULT_MAX_PIXELS,
        help="skip images with more pixels than this as decompression bombs",
    )


BYTE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def byte_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {quoted(text)} (examples: 500000, 200MB, 1GiB)")
    try:
        size = int(Decimal(match.group(1)) * BYTE_UNITS[match.group(2) or ""])
    except (InvalidOperation, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {quoted(text)} (examples: 500000, 200MB, 1GiB)") from None
    if not 1 <= size <= MAX_SHARD_BYTES:
        raise argparse.ArgumentTypeError(f"must be from 1 byte to 1PiB, not {quoted(text)}")
    return size


def build_option_defaults() -> dict[str, object]:
    """Each option add_build_options defines, with its default (what `--part` must be left at)."""
    probe = argparse.ArgumentParser(add_help=False)
    add_build_options(probe)
    return {action.dest: action.default for action in probe._actions}


def build_option_validators() -> dict[str, Callable[[str], object]]:
    """Each option add_build_options defines, and what checks a value of it given as text: its argparse
    type, or its choices (what a plan's options must pass again when a part or merge reads them)."""
    probe = argparse.ArgumentParser(add_help=False)
    add_build_options(probe)
    return {action.dest: _choice(action.choices) if action.choices else action.type for action in probe._actions}


def _choice(choices: Iterable[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text[:80]!r} is not one of {', '.join(sorted(choices))}")
        return text

    return check


def check_build_out(out: Path | str, options, overwrite: bool) -> None:
    """OUT as it is now, before SRC is even listed: a folder (or creatable), and not another build's
    shards unless --overwrite (so that a refused build leaves nothing behind)."""

    publisher_for(out)  # refuses an OUT it cannot write to
    if isinstance(out, Path):
        check_output_folder(out)
        if not (out / MANIFEST_NAME).exists():
            return
    if overwrite:
        return
    try:
        existing = ShardFolder.at(out).manifest()
    except StoreNotFound:
        return
    if existing["options"] != options.as_dict():
        raise UserError(f"{out} already holds shards built with other options; choose another OUT or pass --overwrite")


def build_options(args: argparse.Namespace):

    if args.crop == "celeba" and args.size > 148:
        raise UserError("--crop celeba keeps a 148x148 face: choose --size 148 or less")
    image = ImageSpec(
        size=args.size,
        crop=args.crop,
        format=args.format,
        quality=args.quality,
        mode=args.mode,
        max_pixels=args.max_pixels,
    )
    return BuildOptions(
        image=image,
        shard_size=args.shard_size,
        shard_bytes=args.shard_bytes,
        val_fraction=args.val_fraction,
        seed=args.seed,
        labels=args.labels,
    )
