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
from pydantic import ValidationError
from torch import nn

from pipeline.config import ConfigError, NetworkOptimizer, OptimizerConfig, RunConfig
from pipeline.plugin import ModelPlugin, PluginError, StepOutput, resolved_options
from pipeline.training import deepspeed_internals as internals
from pipeline.training.deepspeed_config import build_deepspeed_config
from pipeline.training.trackers import chosen as chosen_trackers
from pipeline.training.trackers import make_trackers
from shards.errors import UserError, describe_error

OPTIMIZERS = {
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


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


def make_accelerator(config: RunConfig, precision: str) -> Accelerator:
    internals.import_deepspeed()
    single_process_world()
    internals.skip_shared_memory_allreduce()
    ds_config = build_deepspeed_config(config, precision)
    timeout = datetime.timedelta(minutes=config.faults.collective_timeout_minutes)
    bound_collective_waits(timeout)
    handlers = [InitProcessGroupKwargs(timeout=timeout, **({} if torch.cuda.is_available() else {"backend": "gloo"}))]
    trackers = make_trackers(chosen_trackers(config.log_with), Path(config.output_dir))
    accelerator = Accelerator(
        deepspeed_plugin=internals.DeepSpeedPluginForPlainModels(hf_ds_config=ds_config),
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


def first_set(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


# hyper-parameters each optimizer takes besides lr and weight decay (run config, else plugin, else torch)
OPTIMIZER_EXTRAS = {"rmsprop": ("alpha", "eps"), "adam": ("betas", "eps"), "adamw": ("betas", "eps"), "sgd": ()}
ALL_EXTRAS = ("alpha", "betas", "eps")


def optimizer_settings(config: RunConfig, defaults: dict[str, Any], network: str) -> dict[str, Any]:
    """lr and weight decay of one network: run config (that network, then all), then the plugin's
    defaults (that network, then all)."""
    plugin_network = defaults.get(network) if isinstance(defaults.get(network), dict) else {}
    chosen, common = config.optimizer.for_network(network), config.optimizer
    lr = first_set(chosen.lr, common.lr, plugin_network.get("lr"), defaults.get("lr"))
    if lr is None:
        raise ConfigError(f"optimizer.{network}.lr: required (the plugin gives no default)")
    weight_decay = first_set(
        chosen.weight_decay, common.weight_decay, plugin_network.get("weight_decay"), defaults.get("weight_decay"), 0.0
    )
    return {"lr": lr, "weight_decay": weight_decay}


def optimizer_plan(config: RunConfig, defaults: dict[str, Any], networks: list[str]) -> dict[str, Any]:
    """The optimizer a run builds: its name, the hyper-parameters it shares (run config, else plugin, else
    torch's own default: left out), and each network's lr and weight decay."""
    name = config.optimizer.name or defaults.get("name", "adam")
    for key in sorted(set(ALL_EXTRAS) - set(OPTIMIZER_EXTRAS[name])):
        if getattr(config.optimizer, key) is not None:
            raise ConfigError(
                f"optimizer.{key}: {name} takes no {key} (it takes: lr, weight_decay, "
                f"{', '.join(OPTIMIZER_EXTRAS[name]) or 'nothing else'})"
            )
    extras = {key: first_set(getattr(config.optimizer, key), defaults.get(key)) for key in OPTIMIZER_EXTRAS[name]}
    plan = {"name": name, **{key: value for key, value in extras.items() if value is not None}}
    return {**plan, **{network: optimizer_settings(config, defaults, network) for network in networks}}


def checked_optimizer_defaults(plugin: str, defaults: Any, networks: list[str]) -> dict[str, Any]:
    """The plugin's optimizer_defaults(), held to the rules of the config's `optimizer` section: a typo or a
    setting a network cannot have separately is an error, not a silent no-op."""
    if not isinstance(defaults, dict):
        raise PluginError(f"plugin {plugin}: optimizer_defaults() must return a mapping, not {type(defaults).__name__}")
    settings, per_network = list(OptimizerConfig.model_fields), list(NetworkOptimizer.model_fields)
    unknown = sorted(str(key) for key in defaults if key not in settings and key not in networks)
    if unknown:
        raise PluginError(
            f"plugin {plugin}: optimizer_defaults(): {unknown[0]!r} is neither a setting ({', '.join(settings)}) "
            f"nor a network ({', '.join(networks)})"
        )
    for network in networks:
        own = defaults.get(network, {})
        extra = sorted(str(key) for key in own if key not in per_network) if isinstance(own, dict) else []
        if extra:
            raise PluginError(
                f"plugin {plugin}: optimizer_defaults(): {network}.{extra[0]}: a network's own settings are only "
                f"{' and '.join(per_network)} (one optimizer serves every network)"
            )
    try:
        OptimizerConfig.model_validate(defaults)
    except ValidationError as error:
        problems = "; ".join(describe_error(item) for item in error.errors())
        raise PluginError(f"plugin {plugin}: optimizer_defaults(): {problems}") from None
    return defaults


def resolved_config(config: RunConfig, plugin: ModelPlugin, networks: list[str]) -> dict[str, Any]:
    """The run config as the run uses it: every default filled in, the plugin's options as validated, and
    the optimizer each network gets. It is itself a valid config (OUTPUT/config.yaml, --dry-run)."""
    resolved = config.model_dump(mode="json")
    resolved["model"] = resolved_options(plugin, config.model)
    resolved["optimizer"] = optimizer_plan(config, plugin.optimizer_defaults(), networks)
    return resolved


def build_optimizer(config: RunConfig, networks: nn.ModuleDict, defaults: dict[str, Any]) -> torch.optim.Optimizer:
    plan = optimizer_plan(config, defaults, list(networks))
    groups = [
        {"params": list(module.parameters()), "network": name, **plan.pop(name)} for name, module in networks.items()
    ]
    name = plan.pop("name")
    return OPTIMIZERS[name](groups, **plan)
