"""A model plugin that lives only in the tests: a third party adding a model without touching pipeline/.

It is found through its entry point (linear_plugin-0.1.dist-info/entry_points.txt, what `pip install`
would write) when this folder is on PYTHONPATH.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from pipeline.plugin import ImageInfo, StepOutput
from shards.errors import UserError


class LinearGenerator:
    """A linear map from noise to pixels, trained as the decoder of a linear autoencoder: a plugin that can
    sample but not reconstruct (what a GAN is to the contract)."""

    def __init__(self, options: dict[str, Any], image: ImageInfo) -> None:
        self.options = options
        self.shape = (image.channels, image.size, image.size)
        self.pixels = image.channels * image.size * image.size
        self.hidden = int(options.get("hidden", 8))
        self.steps_seen = 0
        # fault injection for the tests: {"steps": [...], "rank": R, "kind": "loss" | "gradient"} makes that
        # rank's loss (or only its gradient) non-finite at those optimizer steps ("spike": 1000 times larger);
        # {"batch_mean": M, "rank": R}
        # at the micro-batch whose mean pixel is M (to 1e-6): a sample that diverges, wherever it comes
        self.nonfinite = options.get("nonfinite")
        # input noise, drawn from torch's global RNG as real plugins draw theirs (reparameterisation): with
        # it on, a resume that does not restore each rank's RNG no longer matches a run that never stopped
        self.noise = float(options.get("noise", 0.0))
        # the step_totals contract: each micro-batch reports the sum of its pixels and their count; a rule
        # {"step": S, "network": N, "above": T} makes N sit out optimizer step S (0 for the first) when the
        # mean pixel of the step's whole global batch is above T. What each rank was told is kept.
        self.skips = options.get("skips", [])
        # a pause in every micro-batch: a run slow enough for a test to signal it mid-run without a race
        self.seconds_per_micro_batch = float(options.get("seconds_per_micro_batch", 0.0))
        self.step = 0
        self.decisions: list[dict] = []
        # {"step": S, "rank": R}: that rank stops on a user's error at optimizer step S (the others go on
        # into the step's collectives), as a rank that met a store gone for good does
        self.user_error = options.get("user_error")

    def build_networks(self) -> dict[str, nn.Module]:
        return {"encoder": nn.Linear(self.pixels, self.hidden), "decoder": nn.Linear(self.hidden, self.pixels)}

    def optimizer_defaults(self) -> dict[str, Any]:
        # overridable for the tests of how defaults are checked
        return self.options.get("optimizer_defaults", {"name": "sgd", "lr": 0.05, "decoder": {"lr": 0.02}})

    def loss(self, networks, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1)
        return (networks["decoder"](networks["encoder"](flat)) - flat).pow(2).mean()

    def training_step(self, networks, images: torch.Tensor, labels: torch.Tensor, step: int) -> StepOutput:
        if self.seconds_per_micro_batch:
            time.sleep(self.seconds_per_micro_batch)
        stop = self.user_error
        if stop and step == stop["step"] and int(os.environ.get("RANK", "0")) == stop["rank"]:
            raise UserError(f"injected: rank {stop['rank']} cannot go on at step {step}")
        clean_mean = float(images.double().mean()) if len(images) else None  # the data's, before the noise
        if self.noise:  # off by default: no draw at all, so runs without it consume no random numbers
            images = images + self.noise * torch.randn_like(images)
        loss = self.loss(networks, images)
        fault = self.nonfinite
        here = fault and int(os.environ.get("RANK", "0")) == fault.get("rank", 0)
        if here and "batch_mean" in fault:
            if clean_mean is not None and abs(clean_mean - fault["batch_mean"]) < 1e-6:
                loss = loss * float("nan")
        elif here and step in fault["steps"]:
            kind = fault.get("kind", "loss")
            if kind == "spike":  # finite, a thousand times the loss: the update is taken, and it hurts
                loss = loss * 1000
            else:
                loss = loss * float("nan") if kind == "loss" else NaNGradient.apply(loss)
        self.steps_seen += 1
        self.step = step
        totals = {}
        if self.skips:
            totals = {"pixels": images.detach().double().sum(), "count": images.new_tensor(images.numel()).double()}
        metrics = {"loss": loss.detach(), "label_mean": labels.float().mean()}
        return StepOutput(loss=loss, metrics=metrics, step_totals=totals)

    def networks_to_skip(self, totals: dict[str, float]) -> set[str]:
        mean = totals["pixels"] / totals["count"]
        skip = {rule["network"] for rule in self.skips if rule["step"] == self.step and mean > rule["above"]}
        self.decisions.append({"step": self.step, "totals": totals, "skip": sorted(skip)})
        return skip

    def sample(self, networks, count: int, generator: torch.Generator) -> torch.Tensor:
        weight = networks["decoder"].weight
        z = torch.randn(count, self.hidden, generator=generator).to(weight.device, weight.dtype)
        return networks["decoder"](z).clamp(-1, 1).view(count, *self.shape)

    def state_dict(self) -> dict[str, Any]:
        return {"steps_seen": self.steps_seen, "decisions": self.decisions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_seen = state["steps_seen"]
        self.decisions = state.get("decisions", [])


class LinearAutoencoder(LinearGenerator):
    """Linear autoencoder on pixels: no batch-dependent layers (for exact accumulation checks)."""

    def reconstruct(self, networks, images: torch.Tensor) -> torch.Tensor:
        return networks["decoder"](networks["encoder"](images.flatten(1))).clamp(-1, 1).view(images.shape)


class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, value: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")
