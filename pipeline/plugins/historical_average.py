"""Historical averaging (Salimans et al. 2016, section 3.3): each player's cost gains
weight x ||theta - (1/t) sum over i = 1..t of theta[i]||^2, theta[i] its parameters at time i.

Here time i is optimizer step i, theta[i] the network's weights at the start of that step (before its
update), the current step's included: at the first step the average is the weights themselves and the
term is 0. The average moves once per optimizer step (the first micro-batch that sees a new step number;
later micro-batches of the step and every rank see the same weights, whole under ZeRO 0-2), as a float32
running mean: mean <- mean + (theta - mean) / t. A network that sat a step out (the equilibrium) still
counts that step, with its unchanged weights: the paper's t counts time, not updates. The means and t are
state that a checkpoint keeps (the plugin's state_tensors, beside the weights) and a resume restores bit
for bit.
"""

from __future__ import annotations

import torch
from torch import nn


class HistoricalAverage:
    def __init__(self, names: tuple[str, ...], weight: float) -> None:
        self.names, self.weight = names, weight
        self.means: dict[str, list[torch.Tensor]] = {}
        self.count = 0  # t: optimizer steps averaged
        self.last_step: int | None = None

    @torch.no_grad()
    def observe(self, networks: nn.ModuleDict, step: int) -> None:
        """At each micro-batch: the weights join the average once per optimizer step."""
        if step == self.last_step:
            return
        self.last_step, self.count = step, self.count + 1
        for name in self.names:
            weights = [parameter.detach().float() for parameter in networks[name].parameters()]
            if name not in self.means:
                self.means[name] = [weight.clone() for weight in weights]
                continue
            for mean, weight in zip(self.means[name], weights, strict=True):
                mean.add_((weight - mean) / self.count)

    def penalty(self, network: nn.Module, name: str) -> torch.Tensor:
        """weight x ||theta - mean||^2 over the network's parameters (its gradient reaches theta only)."""
        total = None
        for parameter, mean in zip(network.parameters(), self.means[name], strict=True):
            wide = torch.promote_types(parameter.dtype, torch.float32)
            term = (parameter.to(wide) - mean.to(parameter.device, wide)).pow(2).sum()
            total = term if total is None else total + term
        return self.weight * total

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"{name}.{index}": mean.cpu() for name in self.means for index, mean in enumerate(self.means[name])}
        if tensors:
            tensors["count"] = torch.tensor(self.count, dtype=torch.int64)
            tensors["last_step"] = torch.tensor(self.last_step, dtype=torch.int64)
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], networks: nn.ModuleDict) -> None:
        """What state_tensors() gave, checked against the networks' shapes (ValueError when it does not
        fit); nothing (a checkpoint of a run without it): the average starts again."""
        self.means, self.count, self.last_step = {}, 0, None
        if not tensors:
            return
        for name in self.names:
            shapes = [parameter.shape for parameter in networks[name].parameters()]
            means = [tensors.get(f"{name}.{index}") for index in range(len(shapes))]
            if any(mean is None or mean.shape != shape for mean, shape in zip(means, shapes, strict=True)):
                raise ValueError(f"the historical average of the {name} does not fit its parameters")
            device = next(networks[name].parameters()).device
            self.means[name] = [mean.to(device, torch.float32) for mean in means]
        self.count, self.last_step = int(tensors["count"]), int(tensors["last_step"])
