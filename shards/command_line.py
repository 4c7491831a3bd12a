"""The conventions both command lines (`shards`, `pipeline`) follow: a usage mistake ends with one line on
stderr and exit status 2 (`ArgumentParser`, `report_error`); every number has a type and a range
(`bounded`); every output path is checked before the work (`check_output_file`, `check_output_folder`);
a command's result goes to stdout (`output`), progress and errors to stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from shards.errors import UserError, without_credentials
from shards.store.remote import is_remote

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


def quoted(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 3]) + "..."


def bounded(kind: type, low: float, high: float | None = None):
    """An argparse type: an int (`kind=int`) or a finite float in [low, high]."""
    noun = "a whole number" if kind is int else "a number"
    allowed = f"from {low} to {high}" if high is not None else f"of at least {low}"

    def parse(text: str):
        refusal = argparse.ArgumentTypeError(f"must be {noun} {allowed}, not {quoted(text)}")
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


def shard_folder(text: str) -> str | Path:
    """A shard folder argument: a local path, or a remote folder's URL (s3://, gs://, http(s)://)."""

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
        raise argparse.ArgumentTypeError(f"{quoted(text)} is not a file name ending in {', '.join(GRID_SUFFIXES)}")
    return path


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
