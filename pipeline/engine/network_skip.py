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

import torch


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
