"""Each network's phase of a GAN step, for metrics.jsonl: its gradient norm as the optimizer is about to
apply it, and whether its update ran.

The norm is measured by a step pre-hook on the torch optimizer that DeepSpeed drives (registered before
NetworkSkip's, so it sees the gradients of networks about to sit out too). Under ZeRO-1/2 that optimizer
holds each param group's flat fp32 partition of this rank, with the gradient averaged over ranks and
accumulation steps (and unscaled under fp16); without partitions (ZeRO-0) each rank holds the whole
gradient. The sums of squares are kept on the device (no synchronisation per step) and added over ranks
only when the metrics are logged, together with the elements each rank saw: whole copies on every rank
are counted once.
"""

from __future__ import annotations

import torch
from torch import nn


class NetworkStats:
    def __init__(self, optimizer: torch.optim.Optimizer, networks: nn.ModuleDict, device: torch.device) -> None:
        self.names = list(networks)
        self.index = {name: position for position, name in enumerate(self.names)}
        self.sizes = [sum(parameter.numel() for parameter in networks[name].parameters()) for name in self.names]
        self.device = device
        self.current = self._zeros()  # this step, this rank: [sum of squares, elements] x network
        self.measured = False  # whether the hook ran this step (known on the host: no device sync)
        self.steps: list[torch.Tensor] = []  # each measured step's, since the last collect()
        self.ran = [0] * len(self.names)  # steps whose update each network took, since the last collect()
        self.step_count = 0
        optimizer.register_step_pre_hook(self._measure)

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(2, len(self.names), dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def _measure(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        # DeepSpeed's ZeRO steps one param group at a time: this may see one network's group per call
        self.measured = True
        for group in optimizer.param_groups:
            index = self.index[group["network"]]
            for parameter in group["params"]:
                if parameter.grad is not None:
                    # vector_norm reads the gradient once; pow(2).sum() wrote and reread a full-size
                    # temporary: on CPU a tenth of a small VAE-GAN step (bench/train_step.py --vaegan)
                    norm = torch.linalg.vector_norm(parameter.grad.detach(), dtype=torch.float32)
                    self.current[0, index] += norm.to(self.device, torch.float64).square()
                    self.current[1, index] += parameter.grad.numel()

    def end_step(self, stepped: set[str]) -> None:
        """At an optimizer step's end: `stepped`, the networks whose update ran."""
        if self.measured:  # else DeepSpeed skipped the step before the optimizer saw it
            self.steps.append(self.current)
        self.current, self.measured = self._zeros(), False
        self.ran = [count + (name in stepped) for count, name in zip(self.ran, self.names, strict=True)]
        self.step_count += 1

    def collect(self, accelerator) -> dict[str, float]:
        """grad_norm/<network>: the mean over the steps since the last call of each step's gradient norm;
        updated/<network>: the share of those steps whose update it took. A collective (every rank has
        measured the same steps)."""
        metrics = {}
        if self.steps:
            totals = accelerator.reduce(torch.stack(self.steps), reduction="sum")  # steps x 2 x networks
            world = accelerator.num_processes
            for index, name in enumerate(self.names):
                squares, elements = totals[:, 0, index], totals[:, 1, index]
                if world > 1:  # a rank that saw the whole gradient held a copy of what every rank held
                    squares = torch.where(elements >= world * self.sizes[index], squares / world, squares)
                metrics[f"grad_norm/{name}"] = squares.sqrt().mean().item()
        for count, name in zip(self.ran, self.names, strict=True):
            metrics[f"updated/{name}"] = count / max(self.step_count, 1)
        self.steps, self.ran, self.step_count = [], [0] * len(self.names), 0
        return metrics
