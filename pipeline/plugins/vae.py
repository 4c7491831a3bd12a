"""The paper's baseline: its encoder and decoder trained as a VAE with a pixel-wise Gaussian likelihood."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from pipeline.config.fields import Integer, Number
from pipeline.errors import PluginError
from pipeline.plugin import ImageInfo, StepOutput
from pipeline.plugins.networks import Decoder, Encoder, check_size, gaussian_kl, reparameterise
from shards.errors import describe_error


class VAEOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latent_size: Integer = Field(128, gt=0, le=4096)
    fc_size: Integer = Field(
        2048, gt=0, le=65536, description="encoder's fully connected layer: 2048 in the paper, 1024 in the code"
    )
    pixel_sigma: Number = Field(0.1, gt=0, description="std of the Gaussian likelihood, in [-1, 1] pixel units")


def parse_options(model: type[BaseModel], options: dict[str, Any], plugin: str) -> Any:
    try:
        return model.model_validate(options)
    except ValidationError as error:
        problems = "; ".join(f"model.{describe_error(item)}" for item in error.errors())
        raise PluginError(f"{plugin}: {problems}") from None


class GaussianLatentModel:
    """Sampling, reconstruction and codes for plugins with `encoder` (-> mu, log-variance) and `decoder`
    networks and a N(0, I) prior of `options.latent_size` dimensions; and their construction: options
    validated by `options_class`, an image size the paper's networks take. Subclasses set `name` and
    `options_class`."""

    name: str
    options_class: type[BaseModel]
    ema_networks = ("encoder", "decoder")  # what users sample and encode with

    def __init__(self, options: dict[str, Any], image: ImageInfo) -> None:
        self.options = parse_options(self.options_class, options, self.name)
        try:
            check_size(image.size)
        except ValueError as error:
            raise PluginError(f"{self.name}: {error}") from None
        self.image = image

    def sample(self, networks: nn.ModuleDict, count: int, generator: torch.Generator) -> torch.Tensor:
        decoder = networks["decoder"]
        weight = next(decoder.parameters())
        z = torch.randn(count, self.options.latent_size, generator=generator).to(weight.device, weight.dtype)
        return decoder(z)

    def reconstruct(self, networks: nn.ModuleDict, images: torch.Tensor) -> torch.Tensor:
        return self.decode(networks, self.encode(networks, images))

    def encode(self, networks: nn.ModuleDict, images: torch.Tensor) -> torch.Tensor:
        return networks["encoder"](images)[0]  # the posterior mean

    def decode(self, networks: nn.ModuleDict, codes: torch.Tensor) -> torch.Tensor:
        return networks["decoder"](codes)


class VAE(GaussianLatentModel):
    """The paper's VAE baseline: encoder + decoder, pixel-wise Gaussian likelihood."""

    name, options_class = "vae", VAEOptions

    def build_networks(self) -> dict[str, nn.Module]:
        size, channels, latent = self.image.size, self.image.channels, self.options.latent_size
        return {
            "encoder": Encoder(size, channels, latent, self.options.fc_size),
            "decoder": Decoder(size, channels, latent),
        }

    def optimizer_defaults(self) -> dict[str, Any]:
        return {"name": "rmsprop", "lr": 3e-4, "alpha": 0.9, "eps": 1e-8, "weight_decay": 0.0}  # the authors

    def training_step(
        self, networks: nn.ModuleDict, images: torch.Tensor, labels: torch.Tensor, step: int
    ) -> StepOutput:
        # Both networks minimise the same negative ELBO: no routing needed.
        mu, log_variance = networks["encoder"](images)
        reconstruction = networks["decoder"](reparameterise(mu, log_variance))
        squared_error = (reconstruction.float() - images.float()).pow(2)
        nll = squared_error.flatten(1).sum(1) / (2 * self.options.pixel_sigma**2)
        kl = gaussian_kl(mu.float(), log_variance.float())
        loss = (nll + kl).mean()
        metrics = {
            "loss": loss.detach(),
            "kl": kl.mean().detach(),
            "nll": nll.mean().detach(),
            "mse": squared_error.mean().detach(),
        }
        return StepOutput(loss=loss, metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
