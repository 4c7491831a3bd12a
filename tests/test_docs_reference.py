"""The reference under docs/ documents every config key and every command option, so that it cannot drift.

Config keys: every key of the run config, walked from its pydantic models (a section that is a mapping by
network name written `optimizer.<network>.lr`), and every option of a built-in plugin (`model.<option>`,
from the plugin classes the `pipeline.plugins` entry points name), has a row in a docs/ table whose first
column is `key`, the key in backticks as its full dotted name; and every such row names a real key.

Command options: every command of `shards` and `pipeline`, walked from their argparse parsers, has a
section in docs/ (a heading that names it in backticks: "## `shards build`", "### `pipeline export`"; the
section runs to the next heading of the same or a higher level). Each of its `--options` appears in
backticks in such a section (`--size N` counts for `--size`), and each positional's metavar appears there
(in a usage line, say). `--help` is argparse's own and left out.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from pydantic import BaseModel

# What the reference documents. Module paths move with the package layout: change them here only.
from pipeline.cli import build_parser as pipeline_parser
from pipeline.config.sections import RunConfig
from shards.cli import build_parser as shards_parser

DOCS = Path(__file__).resolve().parents[1] / "docs"
PLUGIN_GROUP = "pipeline.plugins"
BUILT_IN_PLUGINS = {
    "vae",
    "vaegan",
    "autoencoder-kl",
}  # found among the entry points, so that the walk below is not empty
PER_NETWORK = "<network>"  # how docs write the name of a section keyed by network


# ---------------------------------------------------------------- config keys


def _members(annotation: object) -> list[object]:
    """The types an annotation allows: `X | None` gives X and NoneType, Annotated[X, ...] gives X."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [member for argument in typing.get_args(annotation) for member in _members(argument)]
    return [annotation]


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _per_network(annotation: object) -> type[BaseModel] | None:
    """The section type of a mapping by name (`dict[str, Section]`), else None."""
    if typing.get_origin(annotation) is dict:
        value = typing.get_args(annotation)[1]
        return value if _is_section(value) else None
    return None


def config_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted keys: every value; a section's keys under its name (a section that may be null, a switch such
    as `model.minibatch_discrimination`, is a key of its own too); a mapping of sections by network name
    as `<network>`, whether it is a field or the model's extra keys (`optimizer.<network>.lr`)."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        key, members = prefix + (field.alias or name), _members(field.annotation)
        sections = [member for member in members if _is_section(member)]
        if not sections or type(None) in members:
            keys.add(key)
        for section in sections:
            keys |= config_keys(section, key + ".")
        for member in members:
            if section := _per_network(member):
                keys |= config_keys(section, f"{key}.{PER_NETWORK}.")
    if model.model_config.get("extra") == "allow":
        extra = typing.get_type_hints(model).get("__pydantic_extra__")
        if section := _per_network(extra):
            keys |= config_keys(section, f"{prefix}{PER_NETWORK}.")
    return keys


def plugin_option_keys() -> set[str]:
    """`model.<option>` of each built-in plugin (a third-party plugin documents its own)."""
    points = {point.name: point for point in entry_points(group=PLUGIN_GROUP) if point.value.startswith("pipeline.")}
    assert set(points) >= BUILT_IN_PLUGINS, f"built-in plugins not found among the entry points: {sorted(points)}"
    keys: set[str] = set()
    for point in points.values():
        keys |= config_keys(point.load().options_class, "model.")
    return keys


# ---------------------------------------------------------------- the docs


def doc_pages() -> dict[str, list[str]]:
    return {path.name: path.read_text(encoding="utf-8").splitlines() for path in sorted(DOCS.glob("*.md"))}


def _outside_fences(lines: list[str]) -> Iterator[tuple[int, str]]:
    fenced = False
    for number, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield number, line


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def documented_keys() -> dict[str, str]:
    """Each key that has a row in a table headed `key`, with where it is (page:line)."""
    found: dict[str, str] = {}
    for page, lines in doc_pages().items():
        header = None
        for number, line in _outside_fences(lines):
            if not line.lstrip().startswith("|"):
                header = None
                continue
            cells = _cells(line)
            if header is None:
                header = cells[0].lower()
            elif header == "key" and (key := re.fullmatch(r"`([^`]+)`", cells[0])):
                found.setdefault(key.group(1), f"{page}:{number + 1}")
    return found


def _code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def sections() -> list[tuple[str, str, str]]:
    """(page, heading, text under it down to the next heading of the same or a higher level)."""
    found = []
    for page, lines in doc_pages().items():
        headings = [
            (number, len(match.group(1)), match.group(2))
            for number, line in _outside_fences(lines)
            if (match := re.match(r"(#+)\s+(.*)", line))
        ]
        for index, (number, level, heading) in enumerate(headings):
            end = next((later for later, deeper, _ in headings[index + 1 :] if deeper <= level), len(lines))
            found.append((page, heading, "\n".join(lines[number + 1 : end])))
    return found


# ---------------------------------------------------------------- the commands


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {
        name: subparser
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, subparser in action.choices.items()
    }


def commands() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """("shards", parser), ("shards build", its parser), ... and the same for `pipeline`."""
    todo = [("shards", shards_parser()), ("pipeline", pipeline_parser())]
    while todo:
        name, parser = todo.pop(0)
        yield name, parser
        todo += [(f"{name} {sub}", subparser) for sub, subparser in _subcommands(parser).items()]


def options(parser: argparse.ArgumentParser) -> list[str]:
    return [
        option
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for option in action.option_strings
        if option.startswith("--")
    ]


def positionals(parser: argparse.ArgumentParser) -> list[str]:
    return [
        action.metavar or action.dest
        for action in parser._actions
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction)
    ]


def names_command(heading: str, command: str, parser: argparse.ArgumentParser) -> bool:
    """The heading names the command in a code span: `shards build`, `shards build --executor ray`; not
    `shards build` for `shards` (a subcommand's own section)."""
    words, subcommands = command.split(), _subcommands(parser)
    for span in _code_spans(heading):
        said = span.split()
        if said[: len(words)] == words and (len(said) == len(words) or said[len(words)] not in subcommands):
            return True
    return False


def command_sections(command: str, parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    return [
        (f"{page}: {heading}", text) for page, heading, text in sections() if names_command(heading, command, parser)
    ]


def in_backticks(option: str, text: str) -> bool:
    return any(re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", span) for span in _code_spans(text))


# ---------------------------------------------------------------- the tests


def test_every_config_key_and_plugin_option_has_a_row_in_docs() -> None:
    keys = config_keys(RunConfig) | plugin_option_keys()
    assert {"data.read_timeout", f"optimizer.{PER_NETWORK}.lr", "model.label_smoothing"} <= keys  # the walk works
    missing = sorted(keys - set(documented_keys()))
    assert not missing, (
        "config keys with no row in a docs/ table headed `key` (docs/configuration.md: | `key` | type | "
        f"default | range | meaning |): {missing}"
    )


def test_every_documented_key_is_a_real_key() -> None:
    keys = config_keys(RunConfig) | plugin_option_keys()
    stale = {key: where for key, where in documented_keys().items() if key not in keys}
    assert not stale, f"rows in docs/ for keys that the config and the built-in plugins do not have: {stale}"


COMMANDS = list(commands())


@pytest.mark.parametrize(("command", "parser"), COMMANDS, ids=[name for name, _ in COMMANDS])
def test_every_command_option_is_documented_in_the_commands_section(
    command: str, parser: argparse.ArgumentParser
) -> None:
    found = command_sections(command, parser)
    assert found, f"no section in docs/ whose heading names `{command}` in backticks (e.g. '## `{command}`')"
    text = "\n".join(section for _, section in found)
    where = "; ".join(place for place, _ in found)
    undocumented = [option for option in options(parser) if not in_backticks(option, text)]
    assert not undocumented, f"`{command}`: options not in backticks in its sections ({where}): {undocumented}"
    unnamed = [name for name in positionals(parser) if name.lower() not in text.lower()]
    assert not unnamed, f"`{command}`: positionals not named in its sections ({where}): {unnamed}"
