"""The `shards` command: build, inspect and verify webdataset shards of images."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tarfile
from pathlib import Path

from shards import __version__
from shards.errors import UserError
from shards.imageops import CROPS, FORMATS, MODES, PIL_DEFAULT_MAX_PIXELS, ImageSpec
from shards.progress import console

BYTE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def byte_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500000, 200MB, 1GiB)")
    size = int(float(match.group(1)) * BYTE_UNITS[match.group(2) or ""])
    if size < 1:
        raise argparse.ArgumentTypeError("a shard needs at least 1 byte")
    return size


def bounded(kind: type, low: float, high: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is outside [{low}, {high if high is not None else 'inf'}]")
        return value

    return parse


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shards", description=__doc__)
    parser.add_argument("--version", action="version", version=f"shards {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build",
        help="turn a folder or list of images into shards",
        description="Turn a folder tree of images, or a .txt/.csv list of image paths "
        "(optional second column: label), into OUT/{train,val}-NNNNNN.tar and OUT/manifest.json. "
        "Rerunning after an interruption finishes only what is missing.",
    )
    build.add_argument("src", type=Path, metavar="SRC", help="folder of images, or .txt/.csv list of paths")
    build.add_argument("out", type=Path, metavar="OUT", help="output folder")
    build.add_argument(
        "--size", type=bounded(int, 1, 8192), default=64, help="side of the square output images (default 64)"
    )
    build.add_argument(
        "--crop",
        choices=CROPS,
        default="center",
        help="center: largest centred square; none: squash the whole image; "
        "celeba: the paper's rows 40:188, cols 15:163 of aligned 178x218 images (default center)",
    )
    build.add_argument(
        "--format", choices=sorted(FORMATS), default="png", help="image encoding in the shards (default png)"
    )
    build.add_argument(
        "--quality", type=bounded(int, 1, 100), default=95, help="jpg/webp quality; webp 100 = lossless (default 95)"
    )
    build.add_argument("--mode", choices=MODES, default="RGB", help="RGB or L (grayscale) output (default RGB)")
    build.add_argument(
        "--labels",
        choices=("none", "folder"),
        default="none",
        help="folder: label = first sub-folder under SRC (a list file's 2nd column is always read)",
    )
    build.add_argument("--shard-size", type=bounded(int, 1), default=1000, help="samples per shard (default 1000)")
    build.add_argument(
        "--shard-bytes", type=byte_size, default=None, help="also cap each shard's file size, e.g. 200MB"
    )
    build.add_argument(
        "--val-fraction",
        type=bounded(float, 0.0, 1.0),
        default=0.05,
        help="share of images in the val split, chosen by a hash of each key (default 0.05)",
    )
    build.add_argument("--seed", type=int, default=0, help="order of samples across shards (default 0)")
    build.add_argument(
        "--workers",
        type=bounded(int, 0),
        default=default_workers(),
        help="decode/resize processes; 0 = in this process (default: all cores)",
    )
    build.add_argument(
        "--max-pixels",
        type=bounded(int, 1),
        default=PIL_DEFAULT_MAX_PIXELS,
        help="skip images with more pixels than this as decompression bombs",
    )
    build.add_argument("--overwrite", action="store_true", help="replace shards of a different earlier build in OUT")

    inspect = commands.add_parser(
        "inspect",
        help="summary of a shard folder, optionally a contact sheet",
        description="Print a summary table of OUT; with --grid, save a contact sheet of samples.",
    )
    inspect.add_argument("out", type=Path, metavar="OUT")
    inspect.add_argument("--grid", type=Path, metavar="FILE.png", help="write a contact sheet of samples here")
    inspect.add_argument("--split", choices=("train", "val"), default="train")
    inspect.add_argument(
        "--count", type=bounded(int, 1, 4096), default=64, help="samples in the contact sheet (default 64)"
    )

    verify = commands.add_parser(
        "verify",
        help="check every shard's sha256 and decode every sample",
        description="Exit 0 when every shard matches the manifest and every sample decodes; "
        "otherwise exit 1 and name each bad shard.",
    )
    verify.add_argument("out", type=Path, metavar="OUT")
    verify.add_argument("--workers", type=bounded(int, 0), default=default_workers())

    demo = commands.add_parser(
        "demo-images",
        help="write the embedded demo images (real, labelled) to a folder",
        description="Write real labelled images that ship inside installable packages to "
        "DEST/<label>/*.png: fashion-mnist (Debian dataset-fashion-mnist) or digits (scikit-learn).",
    )
    demo.add_argument("dest", type=Path, metavar="DEST")
    demo.add_argument("--source", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    demo.add_argument("--limit", type=bounded(int, 1), default=None, help="write only the first N images")
    return parser


def run_build(args: argparse.Namespace) -> int:
    from shards.build import BuildOptions, build
    from shards.report import skipped_table, summary_table

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
    options = BuildOptions(
        image=image,
        shard_size=args.shard_size,
        shard_bytes=args.shard_bytes,
        val_fraction=args.val_fraction,
        seed=args.seed,
        labels=args.labels,
    )
    manifest = build(args.src, args.out, options, workers=args.workers, overwrite=args.overwrite)
    console.print(summary_table(manifest))
    skipped = skipped_table(manifest)
    if skipped:
        console.print(skipped)
    console.print(f"wrote {args.out / 'manifest.json'}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from shards.manifest import read_manifest
    from shards.report import contact_sheet, skipped_table, summary_table

    manifest = read_manifest(args.out)
    console.print(summary_table(manifest))
    skipped = skipped_table(manifest)
    if skipped:
        console.print(skipped)
    if args.grid:
        if not manifest["splits"][args.split]["count"]:
            raise UserError(f"split {args.split!r} is empty: nothing to draw")
        try:
            sheet = contact_sheet(args.out, manifest, args.split, args.count)
        except (OSError, tarfile.TarError, EOFError) as error:
            raise UserError(f"cannot read the shards of {args.out} ({error}); run `shards verify`") from None
        try:
            sheet.save(args.grid)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot write {args.grid}: {error} (give a .png path)") from None
        console.print(f"wrote {args.grid}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from shards.verify import verify

    bad = verify(args.out, args.workers)
    for name, problems in bad:
        print(f"BAD {name}: {'; '.join(problems)}", file=sys.stderr)
    if bad:
        print(f"{len(bad)} bad shard(s) in {args.out}", file=sys.stderr)
        return 1
    console.print(f"all shards in {args.out} match the manifest and decode")
    return 0


def run_demo_images(args: argparse.Namespace) -> int:
    from shards.demo_images import write_demo_images

    count = write_demo_images(args.dest, args.source, args.limit)
    console.print(f"{count:,} {args.source} images in {args.dest}")
    return 0


COMMANDS = {"build": run_build, "inspect": run_inspect, "verify": run_verify, "demo-images": run_demo_images}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as error:
        print(f"shards {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shards {args.command}: interrupted; rerun the same command to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
