"""The VAE-GAN of Larsen et al. (2016): encoder, decoder and discriminator, each trained by its own loss.

| network       | minimises                                  |
|---------------|--------------------------------------------|
| encoder       | L_prior + L_llike                          |
| decoder       | gamma * L_llike + L_gen (= -L_GAN's part)  |
| discriminator | L_dis (= -L_GAN)                           |

One forward pass of the paper's step builds all three losses; `own_gradients` (pipeline/plugin.py)
differentiates each with respect to its own network only (torch.autograd.grad) and hands the
gradients to the trainer's one backward. So no loss can leak into another network, nothing runs twice,
and gamma weighs L_llike in the decoder's loss directly, with no gradient rescaling at the latent.

With the authors' equilibrium on, a skipped network gets a zero gradient that micro-batch. Its
optimizer still steps: RMSProp then leaves the weights (without weight decay) but decays its square
average.

Losses are means over the batch of per-example sums (KL over latent dimensions, L_llike over the Dis_l
features), so gamma is per example: the authors' 1e-6 on sums over a batch of 64 is 6.4e-5 here.
The passes, each once, in this order (batch norm running statistics move in each): Enc(x), Dec(z_p),
Dis(x), Dis(x_p), Dec(z), Dis(x_tilde). Needs ZeRO stage 0-2 (parameters must be whole on each rank).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline.config import Flag, Integer, Number
from pipeline.plugin import ImageInfo, StepOutput, own_gradients
from pipeline.plugins.networks import Decoder, Discriminator, Encoder, gaussian_kl, reparameterise
from pipeline.plugins.vae import GaussianLatentModel


class VAEGANOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latent_size: Integer = Field(128, gt=0, le=4096)
    fc_size: Integer = Field(
        2048, gt=0, le=65536, description="encoder FC: 2048 in the paper, 1024 in the authors' code"
    )
    gamma: Number = Field(6.4e-5, gt=0, description="weight of L_llike in the decoder's loss, per example")
    discriminate_reconstructions: Flag = Field(True, description="the paper's third GAN term (authors' code: off)")
    generator_loss: Literal["saturating", "non_saturating"] = "saturating"
    log_eps: Number = Field(1e-3, ge=0, description="added inside the GAN logs, as the authors")
    equilibrium: Flag = Field(False, description="the authors' balance: skip the stronger side's update")
    equilibrium_target: Number = 0.68
    equilibrium_margin: Number = 0.35


class VAEGAN(GaussianLatentModel):
    """The paper's VAE-GAN: learned similarity (discriminator features) for the VAE's likelihood."""

    name, options_class = "vaegan", VAEGANOptions

    def __init__(self, options: dict[str, Any], image: ImageInfo) -> None:
        super().__init__(options, image)
        self.skipped = {"discriminator": 0, "decoder": 0}  # equilibrium counters, kept in checkpoints

    def build_networks(self) -> dict[str, nn.Module]:
        size, channels, latent = self.image.size, self.image.channels, self.options.latent_size
        return {
            "encoder": Encoder(size, channels, latent, self.options.fc_size),
            "decoder": Decoder(size, channels, latent),
            "discriminator": Discriminator(size, channels),
        }

    def optimizer_defaults(self) -> dict[str, Any]:
        return {"name": "rmsprop", "lr": 3e-4, "alpha": 0.9, "eps": 1e-8, "weight_decay": 0.0}  # the authors

    def routed_loss(self, networks: nn.ModuleDict, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One loss whose gradient is, for each network, the gradient of its own loss (module docstring)."""
        losses, metrics = self.own_losses(networks, images)
        return own_gradients(networks, losses), metrics

    def own_losses(self, networks: nn.ModuleDict, images: torch.Tensor) -> tuple[dict, dict]:
        """Each network's own loss (None: not trained this micro-batch), from one forward pass."""
        options = self.options
        encoder, decoder, discriminator = networks["encoder"], networks["decoder"], networks["discriminator"]
        mu, log_variance = encoder(images)
        z = reparameterise(mu, log_variance)
        prior_samples = decoder(torch.randn_like(z))
        real_logit, real_features = discriminator(images)
        prior_logit, _ = discriminator(prior_samples)
        reconstruction = decoder(z)
        reconstruction_logit, reconstruction_features = discriminator(reconstruction)
        real_cost, fake_cost = self._real_loss(real_logit), self._fake_loss(prior_logit)
        train_discriminator, train_decoder = self.equilibrium(real_cost, fake_cost)

        prior = gaussian_kl(mu, log_variance).mean()
        llike = 0.5 * (reconstruction_features - real_features).pow(2).flatten(1).sum(1).mean()
        fake_logits = [prior_logit, reconstruction_logit] if options.discriminate_reconstructions else [prior_logit]
        gen = sum(self._generator_loss(logit) for logit in fake_logits) / len(fake_logits)
        dis = 0.5 * real_cost + 0.5 * sum(self._fake_loss(logit) for logit in fake_logits) / len(fake_logits)
        losses = {
            "encoder": prior + llike,
            "decoder": options.gamma * llike + gen if train_decoder else None,
            "discriminator": dis if train_discriminator else None,
        }
        metrics = {
            "prior": prior,
            "llike": llike,
            "gen": gen,
            "dis": dis,
            "real_cost": real_cost,
            "fake_cost": fake_cost,
            "mse": (reconstruction.float() - images.float()).pow(2).mean(),
        }
        return losses, {name: value.detach() for name, value in metrics.items()}

    def _real_loss(self, logit: torch.Tensor) -> torch.Tensor:
        return -torch.log(torch.sigmoid(logit) + self.options.log_eps).mean()

    def _fake_loss(self, logit: torch.Tensor) -> torch.Tensor:
        return -torch.log(1 - torch.sigmoid(logit) + self.options.log_eps).mean()

    def _generator_loss(self, logit: torch.Tensor) -> torch.Tensor:
        if self.options.generator_loss == "saturating":
            return torch.log(1 - torch.sigmoid(logit) + self.options.log_eps).mean()
        return self._real_loss(logit)

    def equilibrium(self, real_cost: torch.Tensor, fake_cost: torch.Tensor) -> tuple[bool, bool]:
        """The authors' balance: (train the discriminator, train the decoder). Decided per micro-batch on
        each rank; the encoder always trains."""
        if not self.options.equilibrium:
            return True, True
        low = self.options.equilibrium_target - self.options.equilibrium_margin
        high = self.options.equilibrium_target + self.options.equilibrium_margin
        costs = (float(real_cost), float(fake_cost))
        train_discriminator = not any(cost < low for cost in costs)
        train_decoder = not any(cost > high for cost in costs)
        if not (train_discriminator or train_decoder):
            train_discriminator = train_decoder = True
        self.skipped["discriminator"] += not train_discriminator
        self.skipped["decoder"] += not train_decoder
        return train_discriminator, train_decoder

    def training_step(
        self, networks: nn.ModuleDict, images: torch.Tensor, labels: torch.Tensor, step: int
    ) -> StepOutput:
        loss, metrics = self.routed_loss(networks, images)
        return StepOutput(loss=loss, metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = dict(state["skipped"])
