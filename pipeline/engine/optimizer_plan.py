"""The one optimizer of a run: which one, the settings its networks share, and each network's own learning
rate and weight decay, from the run config's `optimizer` section over the plugin's optimizer_defaults()."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from pipeline.config.sections import NetworkOptimizer, OptimizerConfig, RunConfig
from pipeline.errors import ConfigError, PluginError
from shards.errors import describe_error

OPTIMIZERS = {
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


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


def build_optimizer(networks: nn.ModuleDict, plan: dict[str, Any]) -> torch.optim.Optimizer:
    """One torch optimizer, one param group per network with its own settings (optimizer_plan)."""
    plan = dict(plan)
    groups = [
        {"params": list(module.parameters()), "network": name, **plan.pop(name)} for name, module in networks.items()
    ]
    name = plan.pop("name")
    return OPTIMIZERS[name](groups, **plan)
