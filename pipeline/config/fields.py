"""The run configuration: one YAML file plus `key.sub=value` overrides, validated once at start-up,
before any process group or DeepSpeed engine exists. Unknown keys are errors (typos must not be
silently ignored); every bad value is reported, all on one line.

Every number has a type and a range. Booleans are not numbers: pydantic's lax mode would read
`batch_size: true` as 1, so whole numbers are strict (`Integer`) and neither they nor `Number` take a
boolean; `Flag` takes only true/false. `Number` still reads text such as `1e-4`, which YAML 1.1 (PyYAML)
leaves a string.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
)
from pydantic import Strict as StrictMode

from shards.store.remote import is_remote

COUNT_MAX = 2**53  # steps, images, intervals: exact as a float and in any JSON reader
NAME_MAX = 255  # bytes in one file name on Linux file systems


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def _whole_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be a whole number")
    return value


def _path_text(value: Any) -> Any:
    """A path that can name a file: not empty, no NUL byte, no name longer than the file system allows."""
    if isinstance(value, str):
        if not value:
            raise ValueError("an empty path")
        if "\0" in value:
            raise ValueError("a path cannot hold a NUL byte")
        if any(len(os.fsencode(part)) > NAME_MAX for part in Path(value).parts):
            raise ValueError(f"a name in the path is longer than {NAME_MAX} bytes")
    return value


def _json_value(value: Any, where: tuple = ()) -> None:
    """A value a JSON file can hold as it is (`model` options go into each checkpoint's config.json)."""
    place = ".".join(map(str, where)) + ": " if where else ""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{place}the key {key!r} is not text")
            _json_value(item, (*where, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _json_value(item, (*where, index))
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{place}{value} is not a finite number")
    elif not isinstance(value, str | int | float | bool | type(None)):
        raise ValueError(f"{place}a {type(value).__name__} is not a JSON value")


Integer = Annotated[int, BeforeValidator(_not_a_boolean), StrictMode()]  # not 16.0, "16" or true
Number = Annotated[float, BeforeValidator(_not_a_boolean), Field(allow_inf_nan=False)]  # 3, 0.5, "1e-4"
Flag = StrictBool
FilePath = Annotated[Path, BeforeValidator(_path_text)]


def _shards_location(value: Any) -> Any:
    """A shard folder: a URL (s3://, gs://, http(s)://) stays text, anything else is a path."""
    if isinstance(value, str) and is_remote(value):
        return value
    return Path(_path_text(value)) if isinstance(value, str) else value


ShardsLocation = Annotated[Path | str, BeforeValidator(_shards_location)]


SECRET_KEY = re.compile(r"key|secret|token|password|credential|session|authorization", re.IGNORECASE)


def redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: "<redacted>" if SECRET_KEY.search(str(key)) else redacted(item) for key, item in value.items()}
    return value


MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """One worker per core this rank can count on, less the core the rank itself trains on: the cores
    this process may run on (its CPU affinity: SLURM's and containers' limits) shared by the ranks of this
    node (LOCAL_WORLD_SIZE, set by every launcher). At least 1, so that decoding overlaps the step; at
    most MAX_DEFAULT_WORKERS, past which a rank's memory grows for no gain (docs/configuration.md, `data.workers`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks_on_this_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(1, min(MAX_DEFAULT_WORKERS, cores // ranks_on_this_node - 1))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)
