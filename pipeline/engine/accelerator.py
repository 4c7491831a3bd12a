"""Accelerate and DeepSpeed set-up: the Accelerator, the one engine over all networks, its optimizer.

Every network lives in one nn.ModuleDict wrapped by one DeepSpeed engine, with one torch optimizer
holding a param group per network (its own learning rate and weight decay). The plugin's
training_step routes each network's own loss gradient into one loss; one backward and one ZeRO
step then update all networks (docs/design.md has the evidence for this choice).
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from torch import nn

from pipeline.config.sections import RunConfig
from pipeline.engine import deepspeed_internals as internals
from pipeline.engine.trackers import chosen as chosen_trackers
from pipeline.engine.trackers import make_trackers
from pipeline.errors import ConfigError
from pipeline.plugin import ModelPlugin, StepOutput
from shards.errors import UserError


class TrainingModule(nn.Module):
    """What the DeepSpeed engine wraps: the networks, with the plugin's step as forward, so that the
    engine's forward hooks (ZeRO-3 gathering, for one) see every call."""

    def __init__(self, networks: dict[str, nn.Module], plugin: ModelPlugin) -> None:
        super().__init__()
        self.networks = nn.ModuleDict(networks)
        self.plugin = plugin

    def forward(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> StepOutput:
        if len(images) == 0:
            # every sample of this rank's micro-batch was unreadable: the rank still takes its part in the
            # step's collectives, with a zero gradient (plugins need at least one image)
            return StepOutput(loss=sum(parameter.sum() for parameter in self.networks.parameters()) * 0.0)
        return self.plugin.training_step(self.networks, images, labels, step)


def resolve_precision(requested: str) -> str:
    if requested == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision: fp16 needs a GPU (no fp16 training on CPU); use fp32 or bf16")
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def single_process_world() -> None:
    """`python -m pipeline.train` without a launcher: a world of one, so DeepSpeed gets its process group."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def bound_collective_waits(timeout: datetime.timedelta) -> None:
    """Give every process group this timeout: it bounds how long a rank waits in a collective for a peer
    that froze or vanished (a lost node closes no socket). accelerate passes it to the default group,
    but DeepSpeed creates its own groups (the clone of the world group that every ZeRO reduction uses)
    with torch's default, 30 minutes on gloo: a frozen rank hung the others that long (tested)."""
    c10d = importlib.import_module("torch.distributed.distributed_c10d")
    c10d.default_pg_timeout = timeout  # what new_group() takes when no timeout is given
    c10d.default_pg_nccl_timeout = timeout


def make_accelerator(config: RunConfig, precision: str, deepspeed_config: dict[str, Any]) -> Accelerator:
    """deepspeed_config: the run's (resolved_run.ResolvedRun.deepspeed)."""
    internals.import_deepspeed()
    single_process_world()
    internals.skip_shared_memory_allreduce()
    timeout = datetime.timedelta(minutes=config.faults.collective_timeout_minutes)
    bound_collective_waits(timeout)
    handlers = [InitProcessGroupKwargs(timeout=timeout, **({} if torch.cuda.is_available() else {"backend": "gloo"}))]
    trackers = make_trackers(chosen_trackers(config.log_with), Path(config.output_dir))
    accelerator = Accelerator(
        deepspeed_plugin=internals.DeepSpeedPluginForPlainModels(hf_ds_config=deepspeed_config),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision={"fp32": "no"}.get(precision, precision),
        kwargs_handlers=handlers,
        log_with=trackers or None,
        project_dir=str(config.output_dir),
    )
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise UserError(
            f"accelerate started {accelerator.distributed_type.value}, not DeepSpeed: remove `use_cpu: true` from the "
            "accelerate config and unset ACCELERATE_USE_CPU (see launch/accelerate/cpu-2proc.yaml)"
        )
    return accelerator


@torch.no_grad()
def average_batch_norm_statistics(networks: nn.Module, accelerator: Accelerator) -> None:
    """Each rank's running statistics come from its own share of the data, and DeepSpeed never
    synchronises buffers: average them (training itself uses batch statistics, so it is unaffected). A
    collective, before anything uses or saves the statistics."""
    for name, buffer in networks.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            buffer.copy_(accelerator.reduce(buffer.float(), reduction="mean").to(buffer.dtype))
