"""The `shards` command: build, inspect and verify webdataset shards of images.

Both command lines (`shards`, `pipeline`) follow the conventions defined here: a usage mistake ends with
one line on stderr and exit status 2 (`ArgumentParser`, `report_error`); every number has a type and a
range (`bounded`); every output path is checked before the work (`check_output_file`,
`check_output_folder`); a command's result goes to stdout (`output`), progress and errors to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from shards import __version__
from shards.errors import UserError, without_credentials
from shards.imageops import CROPS, FORMATS, MODES, PIL_DEFAULT_MAX_PIXELS, ImageSpec

BYTE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
MAX_SHARD_BYTES = 2**50
MAX_WORKERS = 4096
MAX_GRID = 4096  # images in one contact sheet or grid
SEEDS = (0, 2**31 - 1)  # the run config's range: every seed of both command lines
GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
NAME_MARGIN = 16  # bytes a writer may add to a file name for its temporary file (x.png -> x.tmp.png)
LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")  # what str.splitlines splits on

# A command's result (tables, what it wrote) goes here, so that it can be piped; progress bars,
# warnings and errors go to stderr (`shards.progress.console`).
output = Console()


def one_line(text: str) -> str:
    """`text` as one printable line: line breaks escaped, undecodable file-name bytes as \\xNN, no
    credentials of a URL (errors.without_credentials)."""
    text = without_credentials(text)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(repr(char)[1:-1] if char in LINE_BREAKS else char for char in text)


def report_error(command: str, error: UserError) -> int:
    print(f"{command}: error: {one_line(str(error))}", file=sys.stderr)
    return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes are one line on stderr (`PROG: error: ...`, the usage is in --help)
    and exit status 2. Subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]):
        # `--count=--`: argparse drops the "--" and hands the option an empty list instead of one value
        # (found by tests/test_bad_arguments.py: `reconstruct --count=--` read every image)
        if action.nargs is None and action.option_strings and arg_strings == ["--"]:
            raise argparse.ArgumentError(action, "expected one argument, not '--'")
        return super()._get_values(action, arg_strings)


def _quoted(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 3]) + "..."


def bounded(kind: type, low: float, high: float | None = None):
    """An argparse type: an int (`kind=int`) or a finite float in [low, high]."""
    noun = "a whole number" if kind is int else "a number"
    allowed = f"from {low} to {high}" if high is not None else f"of at least {low}"

    def parse(text: str):
        refusal = argparse.ArgumentTypeError(f"must be {noun} {allowed}, not {_quoted(text)}")
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise refusal from None
        if (kind is float and not math.isfinite(value)) or value < low or (high is not None and value > high):
            raise refusal
        return value

    return parse


def seed(text: str) -> int:
    return bounded(int, *SEEDS)(text)


def byte_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {_quoted(text)} (examples: 500000, 200MB, 1GiB)")
    try:
        size = int(Decimal(match.group(1)) * BYTE_UNITS[match.group(2) or ""])
    except (InvalidOperation, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {_quoted(text)} (examples: 500000, 200MB, 1GiB)") from None
    if not 1 <= size <= MAX_SHARD_BYTES:
        raise argparse.ArgumentTypeError(f"must be from 1 byte to 1PiB, not {_quoted(text)}")
    return size


def shard_folder(text: str) -> str | Path:
    """A shard folder argument: a local path, or a remote folder's URL (s3://, gs://, http(s)://)."""
    from shards.remote import is_remote

    return text if is_remote(text) else Path(text)


SHARD_FOLDER_HELP = (
    "a shard folder, or its URL: s3://, gs://, http(s):// (credentials as the store's own tools read them; "
    "an S3-compatible endpoint from AWS_ENDPOINT_URL)"
)


def _first_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _check_creatable(target: Path, folder: Path) -> None:
    """`folder` exists and takes new files, or can be created (its nearest existing ancestor does)."""
    existing = _first_existing(folder)
    if not existing.is_dir():
        raise UserError(f"cannot write {target}: {existing} is not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # O_TMPFILE where it can: nothing ever appears
    except OSError as error:
        raise UserError(f"cannot write {target}: {existing} is not writable ({error.strerror or error})") from None
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except OSError:
        name_max = 255
    parts = target.relative_to(existing).parts
    for index, part in enumerate(parts):
        margin = NAME_MARGIN if index == len(parts) - 1 else 0  # the file's own name: room for a temporary one
        if len(os.fsencode(part)) + margin > name_max:
            raise UserError(f"cannot write {target}: the name {part[:40]!r}... is too long")


def check_output_file(path: Path) -> None:
    """Before any work: `path` can be written as a file; folders missing above it are created later."""
    try:
        if path.is_dir():
            raise UserError(f"{path} is a folder; give a file name")
        if path.exists() and not path.is_file():
            raise UserError(f"{path} exists and is not a regular file")
        _check_creatable(path, path.parent)
    except OSError as error:  # a name too long, a loop of links, ...
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


def check_output_folder(path: Path) -> None:
    """Before any work: `path` is a folder that takes new files, or one that can be created."""
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} exists and is not a folder")
        _check_creatable(path, path)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


def grid_file(text: str) -> Path:
    """An argparse type: an image file to write, named for its format."""
    path = Path(text)
    if path.suffix.lower() not in GRID_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{_quoted(text)} is not a file name ending in {', '.join(GRID_SUFFIXES)}")
    return path


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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


def part_of(text: str) -> tuple[int, int]:
    """An argparse type: K/N, 1 <= K <= N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]) <= 10**6:
        raise argparse.ArgumentTypeError(f"{_quoted(text)} is not K/N with 1 <= K <= N (e.g. 3/8)")
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


def check_build_out(out: Path | str, options, overwrite: bool) -> None:
    """OUT as it is now, before SRC is even listed: a folder (or creatable), and not another build's
    shards unless --overwrite (so that a refused build leaves nothing behind)."""
    from shards.folder import ShardFolder
    from shards.manifest import MANIFEST_NAME
    from shards.publish import publisher_for
    from shards.remote import StoreNotFound

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
    from shards.build import BuildOptions

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
    from shards.report import skipped_table, summary_table

    output.print(summary_table(manifest))
    skipped = skipped_table(manifest)
    if skipped:
        output.print(skipped)


def print_manifest(manifest: dict, out: Path | str) -> None:
    print_summary(manifest)
    print(f"wrote {manifest_location(out)}")


def run_build(args: argparse.Namespace) -> int:
    from shards.build import build

    if args.part:
        return run_part(args)
    if args.out is None:
        raise UserError("give SRC and OUT (or OUT --part K/N for a part of a planned build)")
    from shards.plan import refuse_or_drop_plan

    options = build_options(args)
    check_build_out(args.out, options, args.overwrite)
    refuse_or_drop_plan(args.out, args.overwrite)
    ray_address = args.ray_address if args.executor == "ray" else None
    with no_empty_out_left(args.out):
        manifest = build(args.src, args.out, options, args.workers, args.overwrite, ray_address)
    print_manifest(manifest, args.out)
    return 0


def run_part(args: argparse.Namespace) -> int:
    from shards.plan import build_part

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
    from shards.plan import write_plan

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
    from shards.plan import merge

    print_manifest(merge(args.out), args.out)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from shards.folder import ShardFolder
    from shards.report import contact_sheet
    from shards.shard_cache import DamagedShard

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
    from shards.verify import verify

    bad = verify(args.out, args.workers)
    for name, problems in bad:  # the findings are the result: stdout, like `sha256sum --check`
        print(f"BAD {name}: {one_line('; '.join(problems))}")
    if bad:
        print(f"shards verify: {len(bad)} bad shard(s) in {one_line(str(args.out))}", file=sys.stderr)
        return 1
    print(f"all shards in {one_line(str(args.out))} match the manifest and decode")
    return 0


def run_demo_images(args: argparse.Namespace) -> int:
    from shards.demo_images import write_demo_images

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
