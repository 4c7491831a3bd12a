"""The run configuration: one YAML file plus `key.sub=value` overrides, validated once at start-up,
before any process group or DeepSpeed engine exists. Unknown keys are errors (typos must not be
silently ignored); every bad value is reported on its own line."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shards.errors import UserError


class ConfigError(UserError):
    pass


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataConfig(Strict):
    shards: Path
    split: Literal["train", "val"] = "train"
    batch_size: int = Field(16, gt=0, description="per-device micro-batch size")
    workers: int = Field(2, ge=0, description="DataLoader worker processes per rank")
    shuffle_shards: int = Field(8, gt=0, description="shards mixed together by the per-epoch shuffle")
    hflip: bool = Field(False, description="random horizontal flip (the paper's CelebA augmentation)")


class NetworkOptimizer(Strict):
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)


class OptimizerConfig(Strict):
    """One optimizer type for all networks (they share one DeepSpeed engine, see docs/design.md);
    learning rate and weight decay per network: optimizer.<network>.lr."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, NetworkOptimizer] = Field(init=False)  # optimizer.<network>: {lr, ...}
    name: Literal["rmsprop", "adam", "adamw", "sgd"] | None = None
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    # unset: the plugin's value, else torch's default (RMSProp decay: the authors' 0.9 is the vaegan default)
    alpha: float | None = Field(None, gt=0, lt=1)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] | None = None
    eps: float | None = Field(None, gt=0)

    def for_network(self, name: str) -> NetworkOptimizer:
        return (self.model_extra or {}).get(name, NetworkOptimizer())


class LRScheduleConfig(Strict):
    """The learning rate over the run, as a factor of every network's optimizer rate (pipeline/lr_schedule.py)."""

    name: Literal["constant", "power_decay"] = "constant"
    power: float = Field(0.75, gt=0, description="power_decay: the authors' 0.75")
    final_fraction: float = Field(5e-4, ge=0, le=1, description="the factor reached at the end (authors: 1e-5 / 0.02)")
    steps: int | None = Field(None, gt=0, description="length of the decay in steps; unset: the run's length")
    every: int = Field(1, gt=0, description="the rate changes every N steps (authors: 250, one of their epochs)")


class DeepSpeedConfig(Strict):
    """zero_stage and offload_optimizer, when set, win over the same settings in `config`;
    unset, they come from `config`, else ZeRO-2 without offload. ZeRO-3 is not offered: the plugins call
    networks with whole parameters (the VAE-GAN's detached-parameter passes) and the trainer saves them."""

    zero_stage: Literal[0, 1, 2] | None = None
    offload_optimizer: Literal["none", "cpu"] | None = None
    config: Path | None = Field(None, description="a DeepSpeed JSON (launch/deepspeed/*.json) to start from")


class CheckpointConfig(Strict):
    every: int = Field(500, gt=0, description="optimizer steps between checkpoints")
    keep_last: int = Field(3, gt=0)


class FaultsConfig(Strict):
    """What the run does when things go wrong (README, "Faults")."""

    max_skipped_steps_in_a_row: int = Field(
        20, gt=0, description="updates skipped for a non-finite loss or gradient, in a row, before the run stops"
    )
    collective_timeout_minutes: float = Field(
        30, gt=0, description="a rank waiting this long for the others in a collective fails the run (no hang)"
    )


class RunConfig(Strict):
    plugin: str
    model: dict[str, Any] = Field(default_factory=dict, description="the plugin's own options")
    data: DataConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; or give max_images")
    max_images: int | None = Field(None, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    log_every: int = Field(10, gt=0)
    sample_every: int = Field(200, gt=0)
    grid_size: int = Field(64, gt=0, description="images in each sample/reconstruction grid")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    output_dir: Path
    resume: str = Field("auto", description="auto | none | PATH to a checkpoint folder")
    seed: int = Field(0, ge=0, lt=2**31)

    @field_validator("resume")
    @classmethod
    def resume_target(cls, value: str) -> str:
        if value not in ("auto", "none") and not Path(value).is_dir():
            raise ValueError(f"must be auto, none or a checkpoint folder; {value} is not a folder")
        return value

    @model_validator(mode="after")
    def one_length(self) -> RunConfig:
        if (self.max_steps is None) == (self.max_images is None):
            raise ValueError("give exactly one of max_steps and max_images")
        return self


def apply_override(tree: dict, assignment: str) -> None:
    """`a.b.c=value`; the value is parsed as YAML, so 3, 1e-4, true, null and [1, 2] mean what they say."""
    key, separator, text = assignment.partition("=")
    if not separator or not key.strip():
        raise ConfigError(f"override {assignment!r} is not key=value (example: data.batch_size=32)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
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
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(location, _known_keys(RunConfig), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{location}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{location}: required"
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"{location or 'config'}: {error['msg']}{shown}"


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        lines = [_describe(item) for item in error.errors()]
        raise ConfigError(f"{path}: " + "; ".join(lines)) from None


def resolved_yaml(config: RunConfig) -> str:
    """What the run folder keeps: every setting, defaults included."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
