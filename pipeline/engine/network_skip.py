"""Networks that sit out one optimizer step entirely: weights AND optimizer state unchanged.

A zero gradient is not a skip: RMSProp still decays its square average, Adam's moments still move the
weights, weight decay still shrinks them. Every torch optimizer leaves a parameter without a gradient
alone (no state update, no step count), so the skip is a step pre-hook on the torch optimizer that
DeepSpeed drives (`deepspeed_internals.torch_optimizer`: under ZeRO-1/2 and bf16 it holds each param group's flat
fp32 partition, and DeepSpeed copies the unchanged masters back into the module's weights) which drops
the gradients of the skipped networks' param groups ("network" key, pipeline/engine/accelerator.py) just before
they would be applied.
"""

from __future__ import annotations

import inspect

import torch

from shards.errors import UserError


class NetworkSkip:
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.networks: set[str] = set()  # sitting out the coming optimizer step
        optimizer.register_step_pre_hook(self._drop_gradients)

    def _drop_gradients(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        # DeepSpeed's ZeRO steps one param group at a time, showing the optimizer only that group
        for group in optimizer.param_groups:
            if group["network"] in self.networks:
                for parameter in group["params"]:
                    parameter.grad = None


def plugin_decision(plugin, name: str, totals: dict[str, float], step: int, networks: set[str]) -> set[str]:
    """The networks a plugin's networks_to_skip(totals, step) names, from the step's totals summed over the
    whole global batch (the same on every rank); a plugin written before `step` was given defines
    networks_to_skip(totals) and is asked only at a step with totals."""
    decide = plugin.networks_to_skip
    if len(inspect.signature(decide).parameters) >= 2:
        skip = set(decide(totals, step))
    elif totals:
        skip = set(decide(totals))
    else:
        return set()
    if not skip <= networks:
        raise UserError(f"plugin {name}: networks_to_skip named {sorted(skip)}: not all are networks")
    return skip
