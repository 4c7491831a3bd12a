"""EMA weights: an exponential moving average of some networks' weights, what users sample with.

After each optimizer step that a network took (not skipped for a non-finite gradient, not sat out by
the plugin's networks_to_skip) and past `ema.start_step`, each of its parameters moves toward the live
weight: ema <- ema + (1 - decay) (weight - ema), in float32. Until then the average is the weights
themselves, so that it starts from what training has reached, not from the initialisation. Buffers (batch
norm's running statistics) are the live network's, copied as they are: they are averages already.

It follows the module's weights, which under ZeRO-1/2 are whole on every rank (under bf16, the module's
bf16 copies of DeepSpeed's fp32 masters, which are partitioned): every rank holds the same average with no
collective, and rank 0 saves it beside the raw weights as <network>.ema.safetensors.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from pipeline.checkpoints.host_copies import host_copy
from pipeline.checkpoints.weights import load_weights
from pipeline.config.sections import EMAConfig
from pipeline.errors import ConfigError

SUFFIX = ".ema.safetensors"


def ema_file(network: str) -> str:
    return f"{network}{SUFFIX}"


def folder_has_ema(folder: Path) -> bool:
    return any(folder.glob(f"*{SUFFIX}"))


class WeightAverage:
    """The averages, as float32 copies of the networks (made before DeepSpeed casts or wraps anything)."""

    def __init__(self, networks: nn.ModuleDict, names: list[str], decay: float, start_step: int) -> None:
        """networks: the live networks (the same modules DeepSpeed then wraps: follow them onto the
        device with `to`)."""
        self.networks, self.names, self.decay, self.start_step = networks, names, decay, start_step
        self.averages = nn.ModuleDict(
            {name: copy.deepcopy(networks[name]).float().requires_grad_(False) for name in names}
        )

    @torch.no_grad()
    def update(self, step: int, stepped: set[str]) -> None:
        """After optimizer step `step`: the networks in `stepped` took it, the others kept their weights.
        Buffers are copied when they are used (copy_buffers), not at every step."""
        for name in self.names:
            if step > self.start_step and name not in stepped:
                continue
            pairs = zip(self.averages[name].parameters(), self.networks[name].parameters(), strict=True)
            for average, weight in pairs:
                if step <= self.start_step:
                    average.copy_(weight)
                else:
                    average.lerp_(weight.float(), 1.0 - self.decay)

    def to(self, device: torch.device) -> None:
        self.averages.to(device)

    @torch.no_grad()
    def copy_buffers(self) -> None:
        """The live networks' buffers into the averages (their batch norm statistics, averaged over ranks
        by the trainer before a checkpoint or an evaluation)."""
        for name, average in self.averages.items():
            parameters = {key for key, _ in average.named_parameters()}
            own = average.state_dict()
            for key, value in self.networks[name].state_dict().items():
                if key not in parameters:
                    own[key].copy_(value)

    def with_averages(self) -> nn.ModuleDict:
        """The networks to use: each averaged network's average, the others as they are."""
        self.copy_buffers()
        averages = dict(self.averages.items())
        return nn.ModuleDict({name: averages.get(name, network) for name, network in self.networks.items()})

    def state(self, copy: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """{network: its average's state dict} on the CPU: what a checkpoint saves (`copy`: copies of their
        own, which training cannot change)."""
        self.copy_buffers()
        return {
            name: {key: host_copy(value, copy) for key, value in average.state_dict().items()}
            for name, average in self.averages.items()
        }

    def load(self, folder: Path, plugin: str) -> bool:
        """The averages a checkpoint saved; False when it has none (a run that turned EMA on later: the
        average then starts from the weights just loaded)."""
        if not all((folder / ema_file(name)).exists() for name in self.names):
            for name in self.names:
                self.averages[name].load_state_dict(self.networks[name].state_dict())
            return False
        load_weights(self.averages, folder, plugin, SUFFIX)
        return True


def weight_average(config: EMAConfig, plugin: object, networks: nn.ModuleDict) -> WeightAverage | None:
    """The run's EMA (None when `ema.decay` is unset): of `ema.networks`, else the plugin's ema_networks,
    else every network."""
    if config.decay is None:
        return None
    names = config.networks if config.networks is not None else list(getattr(plugin, "ema_networks", networks))
    unknown = [name for name in names if name not in networks]
    if unknown or not names:
        raise ConfigError(
            (f"ema.networks: {unknown[0]!r} is not a network of this plugin" if unknown else "ema.networks: empty")
            + f" (its networks: {', '.join(networks)})"
        )
    return WeightAverage(networks, list(dict.fromkeys(names)), config.decay, config.start_step)
