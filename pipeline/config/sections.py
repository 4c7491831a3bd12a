"""The run config's sections: every key, its type, default and range (docs/configuration.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from pipeline.config.fields import (
    COUNT_MAX,
    FilePath,
    Flag,
    Integer,
    Number,
    ShardsLocation,
    Strict,
    _json_value,
    _path_text,
    _whole_number,
    default_workers,
    redacted,
)
from shards.command_line import MAX_GRID
from shards.errors import without_credentials
from shards.store.remote import DEFAULT_READ_TIMEOUT, DEFAULT_RETRY_SECONDS, RemoteAccess


class DataConfig(Strict):
    shards: ShardsLocation = Field(description="a shard folder: a path, or s3://, gs://, http(s)://")
    split: Literal["train", "val"] = "train"
    batch_size: Integer = Field(16, gt=0, le=2**16, description="per-device micro-batch size")
    workers: Integer | None = Field(
        None, ge=0, le=256, description="DataLoader worker processes per rank (default: from the rank's cores)"
    )
    shuffle_shards: Integer = Field(8, gt=0, le=2**20, description="shards mixed together by the per-epoch shuffle")
    hflip: Flag = Field(False, description="random horizontal flip (the paper's CelebA augmentation)")
    random_crop: Integer | None = Field(
        None, gt=0, le=8192, description="train on a random N x N crop of each stored image (with the flip)"
    )
    # remote shard folders only (docs/shards.md, "Remote shards")
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
    model_config = ConfigDict(**Strict.model_config, serialize_by_alias=True)

    every: Integer | None = Field(
        500, gt=0, le=COUNT_MAX, description="optimizer steps between checkpoints (null: by the clock alone)"
    )
    every_minutes: Number | None = Field(
        None, gt=0, le=7 * 24 * 60, description="also a checkpoint once this long has passed since the last one"
    )
    keep_last: Integer = Field(3, gt=0, le=COUNT_MAX)
    # `async` is a Python keyword: the attribute is async_, the key in a config is `async`
    async_: Flag = Field(
        False,
        alias="async",
        description="write checkpoints in a background thread: training stops only to copy the state to host memory",
    )


class EMAConfig(Strict):
    """An exponential moving average of the weights (pipeline/checkpoints/ema.py; docs/configuration.md, "ema")."""

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
    """What the run does when things go wrong (docs/faults.md)."""

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
    grid_size: Integer = Field(64, gt=0, le=MAX_GRID, description="images in each sample/reconstruction grid")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log_with: list[Literal["tensorboard", "wandb", "mlflow", "aim"]] | None = Field(
        None, description="accelerate's trackers (pipeline/engine/trackers.py); null: tensorboard when installed"
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
