"""The run config read once at start-up: one YAML file plus `key.sub=value` overrides, validated against
pipeline/config/sections.py; whatever the file holds, a bad config is one line naming every finding."""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from pipeline.config.sections import RunConfig
from pipeline.errors import ConfigError
from shards.command_line import one_line
from shards.errors import describe_error, shown


def apply_override(tree: dict, assignment: str) -> None:
    """`a.b.c=value`; the value is parsed as YAML, so 3, 1e-4, true, null and [1, 2] mean what they say."""
    key, separator, text = assignment.partition("=")
    if not separator or not key.strip():
        raise ConfigError(f"override {assignment!r} is not key=value (example: data.batch_size=32)")
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        value = text
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for attribute, field in model.model_fields.items():
        name = field.alias or attribute  # checkpoint.async: a keyword, so an alias
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _known_keys(annotation, prefix + name + ".")
    return keys


def _describe(error: dict) -> str:
    """A finding on its own line; an unknown key with the nearest known one, a missing one as required."""
    location = ".".join(shown(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(location, _known_keys(RunConfig), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{location}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{location}: required"
    return describe_error(error) if location else f"config: {describe_error(error)}"


CONFIG_MAX_BYTES = 2**20


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is not None and problem:
        return f"YAML error at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return "YAML error: " + " ".join(str(error).split())


def read_config_tree(path: Path) -> dict:
    """The config file as a mapping, or ConfigError saying in one line why it is not a valid config."""
    try:
        with open(path, "rb") as file:  # not read_bytes: `--config /dev/zero` must not fill the memory
            data = file.read(CONFIG_MAX_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    if len(data) > CONFIG_MAX_BYTES:
        raise ConfigError(f"{path}: not a valid config: larger than {CONFIG_MAX_BYTES // 2**20} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not a valid config: byte 0x{data[error.start]:02x} at offset {error.start} is not UTF-8 "
            "(save the file as UTF-8)"
        ) from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not a valid config: {_yaml_problem(error)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a valid config: nested too deeply") from None
    if tree is None:  # an empty file: every required key is then reported
        tree = {}
    if not isinstance(tree, dict):
        kind = type(tree).__name__
        raise ConfigError(f"{path}: not a valid config: the top level must be a mapping of keys, not a {kind}")
    return tree


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """The validated config, or ConfigError: one line, whatever the file holds (keys with line breaks...)."""
    try:
        return _load_config(Path(path), overrides)
    except ConfigError as error:
        raise ConfigError(one_line(str(error))) from None


def _load_config(path: Path, overrides: list[str]) -> RunConfig:
    tree = read_config_tree(path)
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        config = RunConfig.model_validate(tree)
    except ValidationError as error:
        lines = [_describe(item) for item in error.errors()]
        raise ConfigError(f"{path}: not a valid config: " + "; ".join(lines)) from None
    except RecursionError:  # a YAML alias that refers to itself
        raise ConfigError(f"{path}: not a valid config: a value refers to itself or is nested too deeply") from None
    return config
