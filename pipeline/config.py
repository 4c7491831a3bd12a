"""The run configuration: one YAML file plus `key.sub=value` overrides, validated once at start-up,
before any process group or DeepSpeed engine exists. Unknown keys are errors (typos must not be
silently ignored); every bad value is reported, all on one line.

Every number has a type and a range. Booleans are not numbers: pydantic's lax mode would read
`batch_size: true` as 1, so whole numbers are strict (`Integer`) and neither they nor `Number` take a
boolean; `Flag` takes only true/false. `Number` still reads text such as `1e-4`, which YAML 1.1 (PyYAML)
leaves a string.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic import Strict as StrictMode

from shards.cli import one_line
from shards.errors import UserError, describe_error, shown, without_credentials
from shards.remote import DEFAULT_READ_TIMEOUT, DEFAULT_RETRY_SECONDS, RemoteAccess, is_remote

COUNT_MAX = 2**53  # steps, images, intervals: exact as a float and in any JSON reader
GRID_MAX = 4096  # images in one grid, as the model commands allow
NAME_MAX = 255  # bytes in one file name on Linux file systems


class ConfigError(UserError):
    pass


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
    most MAX_DEFAULT_WORKERS, past which a rank's memory grows for no gain (README, `data.workers`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks_on_this_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(1, min(MAX_DEFAULT_WORKERS, cores // ranks_on_this_node - 1))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataConfig(Strict):
    shards: ShardsLocation = Field(description="a shard folder: a path, or s3://, gs://, http(s)://")
    split: Literal["train", "val"] = "train"
    batch_size: Integer = Field(16, gt=0, le=2**16, description="per-device micro-batch size")
    workers: Integer | None = Field(
        None, ge=0, le=256, description="DataLoader worker processes per rank (default: from the rank's cores)"
    )
    shuffle_shards: Integer = Field(8, gt=0, le=2**20, description="shards mixed together by the per-epoch shuffle")
    hflip: Flag = Field(False, description="random horizontal flip (the paper's CelebA augmentation)")
    # remote shard folders only (README, "Remote shards")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options of the store, e.g. endpoint_url (never credentials)"
    )
    cache_dir: FilePath | None = Field(None, description="node-local shard cache (default: under the temp folder)")
    cache_limit: Integer | None = Field(None, gt=0, description="bytes the shard cache may keep (LRU eviction)")
    retry_seconds: Number = Field(DEFAULT_RETRY_SECONDS, gt=0, le=7 * 86400, description="retry budget of a request")
    read_timeout: Number = Field(
        DEFAULT_READ_TIMEOUT, gt=0, le=86400, description="seconds a request, or 8 MiB of a shard, may take"
    )
    redirects: Literal["same-origin", "any"] = Field(
        "same-origin", description="HTTP redirects followed: same-origin, or any (a CDN on another host)"
    )
    prefetch_shards: Integer | None = Field(
        None, ge=0, le=2**20, description="shards fetched ahead of training (default: 2 x shuffle_shards)"
    )

    @field_serializer("shards")
    def _location_without_credentials(self, location: Path | str) -> str:
        """A URL's user:password@ is never copied into config.yaml, a checkpoint or a tracker."""
        return without_credentials(str(location))

    @field_serializer("storage_options")
    def _without_secrets(self, options: dict[str, Any]) -> dict[str, Any]:
        """Every copy of the config a run writes (config.yaml, each checkpoint) leaves out what looks like a
        credential: those belong in the store's own variables and files, not in run folders."""
        return redacted(options)

    @field_validator("workers")
    @classmethod
    def workers_for_the_cores(cls, value: int | None) -> int:
        return default_workers() if value is None else value

    def remote_access(self) -> RemoteAccess:
        return RemoteAccess(
            self.storage_options,
            self.cache_dir,
            self.cache_limit,
            self.retry_seconds,
            self.read_timeout,
            self.redirects,
        )


class NetworkOptimizer(Strict):
    lr: Number | None = Field(None, gt=0)
    weight_decay: Number | None = Field(None, ge=0)


class OptimizerConfig(Strict):
    """One optimizer type for all networks (they share one DeepSpeed engine, see docs/design.md);
    learning rate and weight decay per network: optimizer.<network>.lr."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, NetworkOptimizer] = Field(init=False)  # optimizer.<network>: {lr, ...}
    name: Literal["rmsprop", "adam", "adamw", "sgd"] | None = None
    lr: Number | None = Field(None, gt=0)
    weight_decay: Number | None = Field(None, ge=0)
    # unset: the plugin's value, else torch's default (RMSProp decay: the authors' 0.9 is the vaegan default)
    alpha: Number | None = Field(None, gt=0, lt=1)
    betas: tuple[Annotated[Number, Field(ge=0, lt=1)], Annotated[Number, Field(ge=0, lt=1)]] | None = None
    eps: Number | None = Field(None, gt=0)

    def for_network(self, name: str) -> NetworkOptimizer:
        return (self.model_extra or {}).get(name, NetworkOptimizer())


class LRScheduleConfig(Strict):
    """The learning rate over the run, a factor of every network's optimizer rate (pipeline/training/lr_schedule.py)."""

    name: Literal["constant", "power_decay"] = "constant"
    power: Number = Field(0.75, gt=0, description="power_decay: the authors' 0.75")
    final_fraction: Number = Field(4e-4, ge=0, le=1, description="the factor at the end (authors: 1e-5 / 0.025)")
    steps: Integer | None = Field(
        None, gt=0, le=COUNT_MAX, description="length of the decay in steps; unset: the run's length"
    )
    every: Integer = Field(
        1, gt=0, le=COUNT_MAX, description="the rate changes every N steps (authors: 250, one of their epochs)"
    )


class DeepSpeedConfig(Strict):
    """zero_stage and offload_optimizer, when set, win over the same settings in `config`;
    unset, they come from `config`, else ZeRO-2 without offload. ZeRO-3 is not offered: the plugins call
    networks with whole parameters (the VAE-GAN's detached-parameter passes) and the trainer saves them."""

    zero_stage: Annotated[Literal[0, 1, 2], BeforeValidator(_whole_number)] | None = None
    offload_optimizer: Literal["none", "cpu"] | None = None
    config: FilePath | None = Field(None, description="a DeepSpeed JSON (launch/deepspeed/*.json) to start from")


class CheckpointConfig(Strict):
    every: Integer | None = Field(
        500, gt=0, le=COUNT_MAX, description="optimizer steps between checkpoints (null: by the clock alone)"
    )
    every_minutes: Number | None = Field(
        None, gt=0, le=7 * 24 * 60, description="also a checkpoint once this long has passed since the last one"
    )
    keep_last: Integer = Field(3, gt=0, le=COUNT_MAX)


class EMAConfig(Strict):
    """An exponential moving average of the weights (pipeline/training/ema.py; README, "EMA weights")."""

    decay: Number | None = Field(None, gt=0, lt=1, description="e.g. 0.999 (null: no EMA)")
    start_step: Integer = Field(0, ge=0, le=COUNT_MAX, description="the average equals the weights up to this step")
    networks: list[str] | None = Field(None, description="the networks averaged (null: the plugin's ema_networks)")


class EvalConfig(Strict):
    """What `pipeline evaluate` measures, during training (pipeline/evaluation/in_training.py)."""

    every: Integer | None = Field(None, gt=0, le=COUNT_MAX, description="optimizer steps between evaluations")
    count: Integer = Field(500, ge=2, le=10**7, description="held-out images, and samples and reconstructions each")
    split: Literal["train", "val"] = "val"
    batch_size: Integer = Field(25, gt=0, le=4096, description="images per extractor call")
    extractor: FilePath | None = Field(None, description="a TorchScript extractor (default: the shipped Inception)")
    resolution: Integer = Field(299, gt=0, le=2048, description="side the images are resized to for the extractor")
    seed: Integer = Field(0, ge=0, lt=2**31, description="the prior samples and KID subsets")
    kid_subsets: Integer = Field(100, gt=0, le=10**6)
    kid_subset_size: Integer = Field(1000, ge=2, le=10**7, description="features per KID subset, at most eval.count")


class FaultsConfig(Strict):
    """What the run does when things go wrong (README, "Faults")."""

    max_skipped_steps_in_a_row: Integer = Field(
        20,
        gt=0,
        le=COUNT_MAX,
        description="updates skipped for a non-finite loss or gradient, in a row, before the run stops",
    )
    collective_timeout_minutes: Number = Field(
        30,
        gt=0,
        le=7 * 24 * 60,
        description="a rank waiting this long for the others in a collective fails the run (no hang); at most a week",
    )
    on_diverge: Literal["stop", "rollback"] = Field(
        "stop",
        description="when updates stay non-finite (or the loss spikes): stop, or roll back to the last checkpoint "
        "and skip the data that led there",
    )
    spike_factor: Number | None = Field(
        None, gt=1, description="also diverged: a step's loss above this many times the median of the last 100"
    )
    rollback_skip_steps: Integer = Field(
        0, ge=0, le=COUNT_MAX, description="steps of data skipped after the divergence, beyond those before it"
    )
    max_rollbacks: Integer = Field(3, gt=0, le=1000, description="rollbacks in the run's record before it stops")
    skip_micro_steps: list[tuple[Integer, Integer]] = Field(
        default_factory=list,
        description="[[FROM, TO], ...]: when the data position reaches global micro-step FROM, it goes on at TO "
        "(what a rollback records)",
    )
    stop_grace_seconds: Number = Field(
        30,
        gt=0,
        le=3600,
        description="after SIGTERM, how long a rank still waiting for data (a stalled store) waits before it stops "
        "without a new checkpoint",
    )


class RunConfig(Strict):
    plugin: str
    model: dict[str, Any] = Field(default_factory=dict, description="the plugin's own options")
    data: DataConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)
    max_steps: Integer | None = Field(None, gt=0, le=COUNT_MAX, description="optimizer steps; or give max_images")
    max_images: Integer | None = Field(None, gt=0, le=COUNT_MAX)
    gradient_accumulation_steps: Integer = Field(1, gt=0, le=2**16)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    log_every: Integer = Field(10, gt=0, le=COUNT_MAX)
    sample_every: Integer = Field(200, gt=0, le=COUNT_MAX)
    grid_size: Integer = Field(64, gt=0, le=GRID_MAX, description="images in each sample/reconstruction grid")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log_with: list[Literal["tensorboard", "wandb", "mlflow", "aim"]] | None = Field(
        None, description="accelerate's trackers (pipeline/training/trackers.py); null: tensorboard when installed"
    )
    output_dir: FilePath
    resume: str = Field("auto", description="auto | none | PATH to a checkpoint folder")
    seed: Integer = Field(0, ge=0, lt=2**31)
    compile: Flag = Field(False, description="torch.compile every network (inductor); off by default")
    determinism: Flag = Field(
        False, description="deterministic kernels only (torch, cuDNN, cuBLAS): bit-identical resume on GPUs"
    )

    @field_validator("model")
    @classmethod
    def json_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        _json_value(value)  # each checkpoint's config.json keeps them
        return value

    @field_validator("resume")
    @classmethod
    def resume_target(cls, value: str) -> str:
        if value in ("auto", "none"):
            return value
        try:
            _path_text(value)
            is_folder = Path(value).is_dir()
        except OSError:
            is_folder = False
        if not is_folder:
            raise ValueError(f"must be auto, none or a checkpoint folder; {value} is not a folder")
        return value

    @model_validator(mode="after")
    def one_length(self) -> RunConfig:
        if (self.max_steps is None) == (self.max_images is None):
            raise ValueError("give exactly one of max_steps and max_images")
        return self

    @model_validator(mode="after")
    def skips_between_steps(self) -> RunConfig:
        """A skip starts and ends between optimizer steps: it leaves out whole global batches."""
        every = self.gradient_accumulation_steps
        for start, end in self.faults.skip_micro_steps:
            if not 0 <= start < end or start % every or end % every:
                raise ValueError(
                    f"faults.skip_micro_steps: [{start}, {end}] must be FROM < TO, both multiples of "
                    f"gradient_accumulation_steps ({every})"
                )
        return self


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
    for name, field in model.model_fields.items():
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


def check_deepspeed_file(config: RunConfig) -> None:
    """deepspeed.config, read and merged as the engine will, now rather than once ranks exist."""
    from pipeline.training.deepspeed_config import build_deepspeed_config  # imports torch: only when there is a file

    try:
        build_deepspeed_config(config, "fp32")
    except UnicodeDecodeError as error:
        raise ConfigError(f"deepspeed.config: {config.deepspeed.config} is not UTF-8 (byte {error.start})") from None


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
    if config.deepspeed.config is not None:
        try:
            check_deepspeed_file(config)
        except ConfigError as error:
            raise ConfigError(f"{path}: not a valid config: {error}") from None
    return config
