"""The `shards` command: build, inspect and verify webdataset shards of images (its conventions:
shards/command_line.py)."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tarfile
from pathlib import Path

from shards import __version__
from shards.build.options import add_build_options, build_option_defaults, build_options, check_build_out
from shards.command_line import (
    MAX_GRID,
    MAX_WORKERS,
    SHARD_FOLDER_HELP,
    ArgumentParser,
    bounded,
    check_output_file,
    check_output_folder,
    default_workers,
    grid_file,
    one_line,
    output,
    quoted,
    report_error,
    shard_folder,
)
from shards.errors import UserError


def part_of(text: str) -> tuple[int, int]:
    """An argparse type: K/N, 1 <= K <= N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]) <= 10**6:
        raise argparse.ArgumentTypeError(f"{quoted(text)} is not K/N with 1 <= K <= N (e.g. 3/8)")
    return int(match[1]), int(match[2])


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"shards {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build",
        help="turn a folder or list of images into shards",
        description="Turn a folder tree of images, or a .txt/.csv list of image paths "
        "(optional second column: label), into OUT/{train,val}-NNNNNN.tar and OUT/manifest.json. "
        "Rerunning after an interruption finishes only what is missing. `shards build OUT --part K/N` "
        "makes part K of a build planned by `shards plan`.",
    )
    build.add_argument(
        "src",
        type=shard_folder,
        metavar="SRC",
        help="folder of images, or .txt/.csv list of paths; or s3:// or gs:// prefix, or a list's URL",
    )
    build.add_argument(
        "out",
        type=shard_folder,
        metavar="OUT",
        nargs="?",
        help="output folder, or s3:// or gs:// (uploaded as shards finish)",
    )
    add_build_options(build)
    build.add_argument(
        "--workers",
        type=bounded(int, 0, MAX_WORKERS),
        default=default_workers(),
        help="decode/resize processes; 0 = in this process (default: all cores)",
    )
    build.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: --workers processes on this machine; ray: one task per shard on a Ray cluster, "
        "SRC and OUT seen by every node (default local)",
    )
    build.add_argument(
        "--ray-address",
        default="auto",
        metavar="ADDRESS",
        help="the Ray cluster for --executor ray: HOST:PORT, or auto, the cluster this machine belongs to",
    )
    build.add_argument(
        "--part",
        type=part_of,
        metavar="K/N",
        help="make only part K of N of the build `shards plan` wrote into OUT (then `shards merge OUT`)",
    )
    build.add_argument("--overwrite", action="store_true", help="replace shards of a different earlier build in OUT")

    plan = commands.add_parser(
        "plan",
        help="list SRC once and plan a build that parts make anywhere (shards build OUT --part K/N)",
        description="List SRC, fix the order of the inputs and which shard each goes into, and write the "
        "plan into OUT/.plan. Then run `shards build OUT --part K/N` for K = 1..N (anywhere, in any order, "
        "at once: a SLURM job array) and `shards merge OUT`. The result is byte-identical to `shards build "
        "SRC OUT` with the same options.",
    )
    plan.add_argument("src", type=shard_folder, metavar="SRC", help="as for shards build")
    plan.add_argument("out", type=shard_folder, metavar="OUT", help="output folder, or s3:// or gs://")
    add_build_options(plan)
    plan.add_argument("--overwrite", action="store_true", help="replace shards of a different earlier build in OUT")

    merge = commands.add_parser(
        "merge",
        help="finish a planned build: check every part is made, write the manifest",
        description="Check that every part of the plan in OUT is made and write OUT/manifest.json (skipped "
        "inputs of every part included); otherwise name the parts still missing and exit 2.",
    )
    merge.add_argument("out", type=shard_folder, metavar="OUT", help="output folder, or s3:// or gs://")

    inspect = commands.add_parser(
        "inspect",
        help="summary of a shard folder, optionally a contact sheet",
        description="Print a summary table of OUT; with --grid, save a contact sheet of samples.",
    )
    inspect.add_argument("out", type=shard_folder, metavar="OUT", help=SHARD_FOLDER_HELP)
    inspect.add_argument(
        "--grid", type=grid_file, metavar="FILE.png", help="write a contact sheet of samples here (.png, .jpg, .webp)"
    )
    inspect.add_argument("--split", choices=("train", "val"), default="train")
    inspect.add_argument(
        "--count", type=bounded(int, 1, MAX_GRID), default=64, help="samples in the contact sheet (default 64)"
    )

    verify = commands.add_parser(
        "verify",
        help="check every shard's sha256 and decode every sample",
        description="Exit 0 when every shard matches the manifest and every sample decodes; "
        "otherwise exit 1 and name each bad shard (one `BAD` line each on stdout).",
    )
    verify.add_argument("out", type=shard_folder, metavar="OUT", help=SHARD_FOLDER_HELP)
    verify.add_argument("--workers", type=bounded(int, 0, MAX_WORKERS), default=default_workers())

    demo = commands.add_parser(
        "demo-images",
        help="write the embedded demo images (real, labelled) to a folder",
        description="Write real labelled images that ship inside installable packages to "
        "DEST/<label>/*.png: fashion-mnist (Debian dataset-fashion-mnist) or digits (scikit-learn).",
    )
    demo.add_argument("dest", type=Path, metavar="DEST")
    demo.add_argument("--source", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    demo.add_argument("--limit", type=bounded(int, 1, 10**9), default=None, help="write only the first N images")
    return parser


@contextlib.contextmanager
def no_empty_out_left(out: Path | str):
    """A refused build (no usable image, say) leaves no empty OUT behind."""
    missing = [folder for folder in (out, *out.parents) if not folder.exists()] if isinstance(out, Path) else []
    try:
        yield
    except UserError:
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def manifest_location(out: Path | str) -> str:
    return one_line(str(out / "manifest.json") if isinstance(out, Path) else out.rstrip("/") + "/manifest.json")


def print_summary(manifest: dict) -> None:
    from shards.check.report import skipped_table, summary_table

    output.print(summary_table(manifest))
    skipped = skipped_table(manifest)
    if skipped:
        output.print(skipped)


def print_manifest(manifest: dict, out: Path | str) -> None:
    print_summary(manifest)
    print(f"wrote {manifest_location(out)}")


def run_build(args: argparse.Namespace) -> int:
    from shards.build.builder import build

    if args.part:
        return run_part(args)
    if args.out is None:
        raise UserError("give SRC and OUT (or OUT --part K/N for a part of a planned build)")
    from shards.build.plan import refuse_or_drop_plan

    options = build_options(args)
    check_build_out(args.out, options, args.overwrite)
    refuse_or_drop_plan(args.out, args.overwrite)
    ray_address = args.ray_address if args.executor == "ray" else None
    with no_empty_out_left(args.out):
        manifest = build(args.src, args.out, options, args.workers, args.overwrite, ray_address)
    print_manifest(manifest, args.out)
    return 0


def run_part(args: argparse.Namespace) -> int:
    from shards.build.plan import build_part

    if args.out is not None:
        raise UserError("--part K/N takes OUT alone: SRC and the options are read from the plan in OUT")
    given = [name for name, default in build_option_defaults().items() if getattr(args, name) != default]
    if given or args.executor != "local" or args.overwrite:
        named = ", ".join("--" + name.replace("_", "-") for name in given) or "--executor/--overwrite"
        raise UserError(f"--part K/N reads the build options from the plan: give {named} to `shards plan`")
    part, parts = args.part
    shards, inputs = build_part(args.src, part, parts, args.workers)
    print(f"part {part}/{parts} of {one_line(str(args.src))}: {shards} planned shard(s), {inputs:,} input(s) made")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from shards.build.plan import write_plan

    options = build_options(args)
    check_build_out(args.out, options, args.overwrite)
    with no_empty_out_left(args.out):
        plan, size = write_plan(args.src, args.out, options)
    counts = plan.counts
    shards = len(plan.part_ranges(1, 1))
    where = one_line(str(args.out))
    print(
        f"planned {sum(counts.values()):,} inputs (train {counts['train']:,}, val {counts['val']:,}) in {shards:,} "
        f"shard(s): {size / 2**20:.1f} MiB in {where}/.plan\n"
        f"next: shards build {where} --part K/N for K = 1..N (N <= {shards:,} is useful), then shards merge {where}"
    )
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from shards.build.plan import merge

    print_manifest(merge(args.out), args.out)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from shards.check.report import contact_sheet
    from shards.read.folder import ShardFolder
    from shards.read.shard_cache import DamagedShard

    folder = ShardFolder.at(args.out)
    manifest = folder.manifest()
    if args.grid:
        check_output_file(args.grid)
        if not manifest["splits"][args.split]["count"]:
            raise UserError(f"split {args.split!r} is empty: nothing to draw")
    print_summary(manifest)
    if args.grid:
        try:
            sheet = contact_sheet(folder, manifest, args.split, args.count)
        except (OSError, tarfile.TarError, EOFError, DamagedShard) as error:
            raise UserError(f"cannot read the shards of {args.out} ({error}); run `shards verify`") from None
        try:
            args.grid.parent.mkdir(parents=True, exist_ok=True)
            sheet.save(args.grid)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot write {args.grid}: {error}") from None
        print(f"wrote {one_line(str(args.grid))}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from shards.check.verify import verify

    bad = verify(args.out, args.workers)
    for name, problems in bad:  # the findings are the result: stdout, like `sha256sum --check`
        print(f"BAD {name}: {one_line('; '.join(problems))}")
    if bad:
        print(f"shards verify: {len(bad)} bad shard(s) in {one_line(str(args.out))}", file=sys.stderr)
        return 1
    print(f"all shards in {one_line(str(args.out))} match the manifest and decode")
    return 0


def run_demo_images(args: argparse.Namespace) -> int:
    from shards.build.demo_images import write_demo_images

    check_output_folder(args.dest)
    count = write_demo_images(args.dest, args.source, args.limit)
    print(f"{count:,} {args.source} images in {one_line(str(args.dest))}")
    return 0


COMMANDS = {
    "build": run_build,
    "plan": run_plan,
    "merge": run_merge,
    "inspect": run_inspect,
    "verify": run_verify,
    "demo-images": run_demo_images,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as error:
        return report_error(f"shards {args.command}", error)
    except KeyboardInterrupt:
        print(f"shards {args.command}: interrupted; rerun the same command to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
