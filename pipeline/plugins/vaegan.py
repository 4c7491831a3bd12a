"""The VAE-GAN of Larsen et al. (2016): encoder, decoder and discriminator, each trained by its own loss.

| network       | minimises                                  |
|---------------|--------------------------------------------|
| encoder       | L_prior + L_llike                          |
| decoder       | gamma * L_llike + L_gen (= -L_GAN's part)  |
| discriminator | L_dis (= -L_GAN)                           |

One backward must give each network exactly its own gradient (pipeline/plugin.py), so the step builds one
routed loss:

    L_prior                                              encoder only (mu, log-variance)
  + gamma * L_llike(Dis_l(x), Dis_l(Dec(scale_grad(z, 1/gamma))))   discriminator parameters detached:
                                                         decoder gets gamma x, encoder 1 x the gradient
  + L_gen(Dis(Dec(z.detach())), Dis(Dec(z_p)))           discriminator parameters detached: decoder only
  + L_dis(Dis(x), Dis(x_tilde.detach()), Dis(x_p.detach()))          discriminator only

With the authors' equilibrium on, a skipped network's terms get weight 0 (and a skipped decoder is
called with detached parameters for the content term), so it receives no gradient that step. Its
optimizer still steps with a zero gradient: RMSProp then leaves the weights (without weight decay) but
decays its square average.

Losses are means over the batch of per-example sums (KL over latent dimensions, L_llike over the Dis_l
features), so gamma is per example: the authors' 1e-6 on sums over a batch of 64 is 6.4e-5 here.
The passes that update batch norm statistics are the method's six, in this order: Enc(x), Dec(z_p),
Dis(x), Dis(x_p) (the equilibrium needs these two first), Dec(z), Dis(x_tilde). Passes that only repeat
a pass of the method (the decoder on z.detach(), the discriminator with detached
parameters) run with BatchNorm running statistics frozen, so the statistics move once per pass of the
paper's step. Needs ZeRO stage 0-2 (parameters must be whole on each rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from pipeline.plugin import ImageInfo, StepOutput
from pipeline.plugins.networks import Decoder, Discriminator, Encoder, gaussian_kl, reparameterise
from pipeline.plugins.vae import GaussianLatentModel


class VAEGANOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latent_size: int = Field(128, gt=0)
    fc_size: int = Field(2048, gt=0, description="encoder FC: 2048 in the paper, 1024 in the authors' code")
    gamma: float = Field(6.4e-5, gt=0, description="weight of L_llike in the decoder's loss, per example")
    discriminate_reconstructions: bool = Field(True, description="the paper's third GAN term (authors' code: off)")
    generator_loss: Literal["saturating", "non_saturating"] = "saturating"
    log_eps: float = Field(1e-3, ge=0, description="added inside the GAN logs, as the authors")
    equilibrium: bool = Field(False, description="the authors' balance: skip the stronger side's update")
    equilibrium_target: float = 0.68
    equilibrium_margin: float = 0.35


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` on the way back."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> tuple[torch.Tensor, None]:
        return gradient * ctx.scale, None


def scale_gradient(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    return _ScaleGradient.apply(tensor, scale)


@contextlib.contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Batch norm still normalises with the batch's statistics, but its running averages stay put."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for norm in norms:
        norm.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for norm, (momentum, tracked) in zip(norms, saved, strict=True):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(tracked)


def without_training(network: nn.Module, *inputs: torch.Tensor, repeat: bool = True):
    """Call `network` so that gradients reach its inputs but not its parameters. A repeat of a pass
    already made leaves the batch norm running statistics alone."""
    detached = {name: parameter.detach() for name, parameter in network.named_parameters()}
    with running_stats_frozen(network) if repeat else contextlib.nullcontext():
        return functional_call(network, detached, inputs)


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
        options = self.options
        encoder, decoder, discriminator = networks["encoder"], networks["decoder"], networks["discriminator"]
        mu, log_variance = encoder(images)
        z = reparameterise(mu, log_variance)
        prior_samples = decoder(torch.randn_like(z))
        real_logit, real_features = discriminator(images)
        prior_logit, _ = discriminator(prior_samples.detach())
        real_cost, fake_cost = self._real_loss(real_logit), self._fake_loss(prior_logit)
        train_discriminator, train_decoder = self.equilibrium(real_cost, fake_cost)

        if train_decoder:  # decoder trained by gamma * L_llike; the encoder by 1 * L_llike
            reconstruction = decoder(scale_gradient(z, 1.0 / options.gamma))
            content_weight = options.gamma
        else:  # decoder not trained this step; its forward pass still counts for batch norm
            reconstruction = without_training(decoder, z, repeat=False)
            content_weight = 1.0
        _, reconstruction_features = without_training(discriminator, reconstruction)
        llike = 0.5 * (reconstruction_features - real_features.detach()).pow(2).flatten(1).sum(1).mean()

        fake_logits, generated = [prior_logit], [prior_samples]
        if options.discriminate_reconstructions:
            fake_logits.append(discriminator(reconstruction.detach())[0])
            with running_stats_frozen(decoder):  # the reconstruction again, with no path to the encoder
                generated.append(decoder(z.detach()))
        generator = [self._generator_loss(without_training(discriminator, fake)[0]) for fake in generated]
        gen = sum(generator) / len(generator)
        dis = 0.5 * real_cost + 0.5 * sum(self._fake_loss(logit) for logit in fake_logits) / len(fake_logits)
        prior = gaussian_kl(mu, log_variance).mean()

        loss = prior + content_weight * llike + train_decoder * gen + train_discriminator * dis
        metrics = {
            "prior": prior,
            "llike": llike,
            "gen": gen,
            "dis": dis,
            "real_cost": real_cost,
            "fake_cost": fake_cost,
            "mse": (reconstruction.float() - images.float()).pow(2).mean(),
        }
        return loss, {name: value.detach() for name, value in metrics.items()}

    def _real_loss(self, logit: torch.Tensor) -> torch.Tensor:
        return -torch.log(torch.sigmoid(logit) + self.options.log_eps).mean()

    def _fake_loss(self, logit: torch.Tensor) -> torch.Tensor:
        return -torch.log(1 - torch.sigmoid(logit) + self.options.log_eps).mean()

    def _generator_loss(self, logit: torch.Tensor) -> torch.Tensor:
        if self.options.generator_loss == "saturating":
            return torch.log(1 - torch.sigmoid(logit) + self.options.log_eps).mean()
        return self._real_loss(logit)

    def equilibrium(self, real_cost: torch.Tensor, fake_cost: torch.Tensor) -> tuple[float, float]:
        """The authors' balance: (train the discriminator, train the decoder), each 0.0 or 1.0. Decided
        per micro-batch on each rank; the encoder always trains."""
        if not self.options.equilibrium:
            return 1.0, 1.0
        low = self.options.equilibrium_target - self.options.equilibrium_margin
        high = self.options.equilibrium_target + self.options.equilibrium_margin
        costs = (float(real_cost), float(fake_cost))
        train_discriminator = not any(cost < low for cost in costs)
        train_decoder = not any(cost > high for cost in costs)
        if not (train_discriminator or train_decoder):
            train_discriminator = train_decoder = True
        self.skipped["discriminator"] += not train_discriminator
        self.skipped["decoder"] += not train_decoder
        return float(train_discriminator), float(train_decoder)

    def training_step(
        self, networks: nn.ModuleDict, images: torch.Tensor, labels: torch.Tensor, step: int
    ) -> StepOutput:
        loss, metrics = self.routed_loss(networks, images)
        return StepOutput(loss=loss, metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = dict(state["skipped"])
