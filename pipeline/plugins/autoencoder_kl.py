"""`autoencoder-kl`: the VAE-GAN as latent diffusion trains it (Rombach et al. 2022; CompVis/latent-diffusion
ldm/models/autoencoder.py with ldm/modules/losses/contperceptual.py's LPIPSWithDiscriminator): a
KL-regularised autoencoder (kl_autoencoder.py, diffusers' AutoencoderKL module for module) trained with a
pixel loss, a perceptual loss and a patch discriminator.

The loss, per micro-batch of B images x in [-1, 1], reconstruction x~ = Dec(z), z ~ q(z|x):
    rec   = |x - x~| + perceptual_weight * P(x, x~)          (P: one value per image, broadcast over pixels)
    nll   = sum over images and pixels of rec / exp(logvar) + logvar, / B
    kl    = sum over images and latents of KL(q(z|x) || N(0, I)), / B
    g     = -mean D(x~)                                       (the generator's GAN term)
    w     = clamp(||grad_last nll|| / (||grad_last g|| + 1e-4), 0, 1e4) * disc_weight
            (the adaptive weight, gradients at the decoder's last layer, a constant)
    f     = disc_factor from step disc_start on, else 0
    encoder and decoder:  nll + kl_weight * kl + w * f * g
    discriminator:        f * hinge(D(x), D(x~))  or  f * vanilla(...)
with hinge = (mean relu(1 - D(x)) + mean relu(1 + D(x~))) / 2 and vanilla = (mean softplus(-D(x)) +
mean softplus(D(x~))) / 2. P is `perceptual`: none (0), `lpips` (lpips.py, as the references; its
weights a file the user gives, never trained: an auxiliary module of pipeline/plugin.py), or
`discriminator`, the 2016 paper's learned similarity: the mean squared difference of the discriminator's
last hidden layer for x and x~.

Where this differs from the references, on purpose:
- One forward, one optimizer step for all three networks (pipeline/plugin.py's own_gradients): the
  references alternate two optimizer steps per batch in Lightning, the second rerunning the
  autoencoder with a fresh posterior sample. Here the discriminator is trained on the same x~ the
  autoencoder's terms were computed from, and its batch norm sees two batches a step (x~, x), not three.
- The adaptive weight is computed per rank and micro-batch, as the references compute it per GPU and
  batch: it depends on how a global batch is split, exactly as theirs does.
- Before disc_start the discriminator takes no optimizer step at all (networks_to_skip): its weights and
  optimizer state stay as initialised, and its metrics and the GAN terms are left out of the logs until
  the step it starts. The references run its forward and a zero loss.
- logvar is a constant (logvar_init) unless learn_logvar: the references declare it trainable but give it
  to neither optimizer, so it stays at 0 there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from pipeline.config.fields import Flag, Integer, Number
from pipeline.errors import PluginError, mismatch
from pipeline.plugin import ImageInfo, StepOutput, own_gradients
from pipeline.plugins.kl_autoencoder import LatentDecoder, PatchDiscriminator, PosteriorEncoder
from pipeline.plugins.lpips import LPIPS
from pipeline.plugins.vae import parse_options

ADAPTIVE_WEIGHT_EPS, ADAPTIVE_WEIGHT_MAX = 1e-4, 1e4  # contperceptual.py's calculate_adaptive_weight
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"  # what AutoencoderKL.save_pretrained writes


class AutoencoderKLOptions(BaseModel):
    """Names and defaults of the references: Stable Diffusion's kl-f8 and LDM's loss config."""

    model_config = ConfigDict(extra="forbid")
    block_out_channels: list[Integer] = Field([128, 256, 512, 512], min_length=1, max_length=8)
    layers_per_block: Integer = Field(2, gt=0, le=16)
    latent_channels: Integer = Field(4, gt=0, le=256)
    norm_num_groups: Integer = Field(32, gt=0, le=1024)
    mid_block_add_attention: Flag = True
    kl_weight: Number = Field(1e-6, ge=0)
    disc_start: Integer = Field(50001, ge=0, le=2**53, description="the step from which the GAN terms count")
    disc_weight: Number = Field(0.5, ge=0)
    disc_factor: Number = Field(1.0, ge=0)
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_layers: Integer = Field(3, gt=0, le=8)
    disc_channels: Integer = Field(64, gt=0, le=1024)
    perceptual: Literal["none", "discriminator", "lpips"] = "none"
    lpips_weights: str | None = Field(None, description="with perceptual: lpips, its weights (pipeline lpips-weights)")
    perceptual_weight: Number = Field(1.0, ge=0)
    logvar_init: Number = 0.0
    learn_logvar: Flag = False
    sample_posterior: Flag = Field(True, description="train on z ~ q(z|x); false: on its mean")
    init_from: str | None = Field(None, description="a diffusers AutoencoderKL folder to start from (fine-tuning)")

    @model_validator(mode="after")
    def _lpips_has_weights(self) -> AutoencoderKLOptions:
        if self.perceptual == "lpips" and self.lpips_weights is None:
            raise ValueError("perceptual: lpips needs lpips_weights (a file `pipeline lpips-weights` makes)")
        return self

    @model_validator(mode="after")
    def _widths_divide_into_groups(self) -> AutoencoderKLOptions:
        for width in self.block_out_channels:
            if width <= 0 or width % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels: {width} is not a positive multiple of norm_num_groups {self.norm_num_groups}"
                )
        return self


class AutoencoderKL:
    """Latent diffusion's KL autoencoder with LPIPSWithDiscriminator's loss, diffusers' module names."""

    name, options_class = "autoencoder-kl", AutoencoderKLOptions
    ema_networks = ("encoder", "decoder")

    def __init__(self, options: dict[str, Any], image: ImageInfo) -> None:
        self.options = parse_options(AutoencoderKLOptions, options, self.name)
        factor = 2 ** (len(self.options.block_out_channels) - 1)
        if image.size % factor:
            raise PluginError(
                f"{self.name}: images of {image.size} px do not divide by the {factor}x downsampling of "
                f"{len(self.options.block_out_channels)} block_out_channels"
            )
        smallest = 3 * 2**self.options.disc_layers  # each strided layer halves, the last two take 1 px each
        if image.size < smallest:
            raise PluginError(
                f"{self.name}: images of {image.size} px are too small for disc_layers {self.options.disc_layers} "
                f"(at least {smallest} px)"
            )
        self.image = image
        self.lpips: LPIPS | None = None  # with perceptual: lpips, built by build_auxiliary from its file

    def build_networks(self) -> dict[str, nn.Module]:
        options, channels = self.options, self.image.channels
        shape = (list(options.block_out_channels), options.layers_per_block, options.norm_num_groups)
        attention = options.mid_block_add_attention
        decoder = LatentDecoder(options.latent_channels, channels, *shape, attention)
        if options.learn_logvar:
            # one element, not a 0-dim tensor: DeepSpeed broadcasts parameters viewed as bytes
            decoder.logvar = nn.Parameter(torch.full((1,), float(options.logvar_init)))
        return {
            "encoder": PosteriorEncoder(channels, options.latent_channels, *shape, attention),
            "decoder": decoder,
            "discriminator": PatchDiscriminator(channels, options.disc_channels, options.disc_layers),
        }

    def optimizer_defaults(self) -> dict[str, Any]:
        # LDM: Adam, betas (0.5, 0.9), no weight decay; base_learning_rate 4.5e-6, which main.py scales by
        # the global batch (accumulation x GPUs x batch): give the scaled one as optimizer.lr
        return {"name": "adam", "lr": 4.5e-6, "betas": [0.5, 0.9], "weight_decay": 0.0}

    def initial_weights(self) -> Path | None:
        """init_from's diffusion_pytorch_model.safetensors (pipeline/plugin.py: the trainer reads it)."""
        if self.options.init_from is None:
            return None
        return Path(self.options.init_from) / DIFFUSERS_WEIGHTS

    def initial_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """diffusers' AutoencoderKL state dict split into the encoder's and the decoder's (their names are
        diffusers' own); the discriminator keeps its initialisation."""
        encoder = {key: value for key, value in tensors.items() if key.startswith(("encoder.", "quant_conv."))}
        decoder = {key: value for key, value in tensors.items() if key not in encoder}
        if self.options.learn_logvar:
            decoder["logvar"] = torch.full((1,), float(self.options.logvar_init))
        return {"encoder": encoder, "decoder": decoder}

    def auxiliary_files(self) -> dict[str, Path]:
        """LPIPS's weights, a frozen network of the loss (pipeline/plugin.py: the trainer reads the file)."""
        return {"lpips": Path(self.options.lpips_weights)} if self.options.perceptual == "lpips" else {}

    def build_auxiliary(self, tensors: dict[str, dict[str, torch.Tensor]]) -> dict[str, nn.Module]:
        self.lpips = LPIPS()
        try:
            self.lpips.load_state_dict(tensors["lpips"], strict=True)
        except RuntimeError as error:
            first = mismatch(error)
            raise PluginError(f"{self.name}: model.lpips_weights is not LPIPS VGG16's ({first})") from None
        return {"lpips": self.lpips}

    def discriminating(self, step: int) -> bool:
        return self.options.disc_factor > 0 and step >= self.options.disc_start

    def networks_to_skip(self, totals: dict[str, float], step: int) -> set[str]:
        """Before disc_start the discriminator takes no step (module docstring)."""
        return set() if self.discriminating(step) else {"discriminator"}

    def own_losses(self, networks: nn.ModuleDict, images: torch.Tensor, step: int) -> tuple[dict, dict]:
        """Each network's own loss from one forward pass (module docstring), and detached metrics."""
        options = self.options
        mean, log_variance = networks["encoder"](images)
        # torch.randn of the shape, as the references draw (randn_like would follow the chunk's strides)
        noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
        z = mean + torch.exp(0.5 * log_variance) * noise if options.sample_posterior else mean
        reconstruction = networks["decoder"](z)
        discriminator = networks["discriminator"]
        gan = self.discriminating(step)
        fake_hidden, fake_logits = discriminator.features(reconstruction) if gan or self.feature_loss else (None, None)
        rec = (wide(images) - wide(reconstruction)).abs()
        if options.perceptual == "lpips" and options.perceptual_weight > 0:
            rec = rec + options.perceptual_weight * wide(self.lpips(images, reconstruction))
        if options.perceptual == "discriminator" and options.perceptual_weight > 0:
            real_hidden = discriminator.features(images)[0].detach()
            perceptual = (wide(fake_hidden) - wide(real_hidden)).pow(2).flatten(1).mean(1)
            rec = rec + options.perceptual_weight * perceptual[:, None, None, None]
        logvar = self.logvar(networks)
        batch = images.shape[0]
        nll = (rec / torch.exp(logvar) + logvar).sum() / batch
        mean, log_variance = wide(mean), wide(log_variance)
        kl = 0.5 * (mean.pow(2) + log_variance.exp() - 1.0 - log_variance).sum() / batch
        autoencoder = nll + options.kl_weight * kl
        metrics = {"nll_loss": nll.detach(), "kl_loss": kl.detach(), "rec_loss": rec.detach().mean()}
        losses: dict[str, torch.Tensor | None] = {"discriminator": None}
        if gan:
            g_loss = -fake_logits.mean()
            weight = adaptive_weight(nll, g_loss, networks["decoder"].last_layer) * options.disc_weight
            autoencoder = autoencoder + weight * options.disc_factor * g_loss
            real_logits = discriminator(images)
            d_loss = options.disc_factor * discriminator_loss(options.disc_loss, real_logits, fake_logits)
            losses["discriminator"] = d_loss
            metrics.update(
                g_loss=g_loss.detach(),
                d_weight=weight,
                disc_loss=d_loss.detach(),
                logits_real=real_logits.detach().mean(),
                logits_fake=fake_logits.detach().mean(),
            )
        losses["encoder"] = losses["decoder"] = autoencoder
        metrics["total_loss"] = autoencoder.detach()
        return losses, metrics

    @property
    def feature_loss(self) -> bool:
        return self.options.perceptual == "discriminator" and self.options.perceptual_weight > 0

    def logvar(self, networks: nn.ModuleDict) -> torch.Tensor:
        learnt = getattr(networks["decoder"], "logvar", None)
        return wide(learnt) if learnt is not None else torch.tensor(float(self.options.logvar_init))

    def training_step(
        self, networks: nn.ModuleDict, images: torch.Tensor, labels: torch.Tensor, step: int
    ) -> StepOutput:
        losses, metrics = self.own_losses(networks, images, step)
        return StepOutput(loss=own_gradients(networks, losses), metrics=metrics)

    def reconstruct(self, networks: nn.ModuleDict, images: torch.Tensor) -> torch.Tensor:
        return networks["decoder"](networks["encoder"](images)[0])

    def encode(self, networks: nn.ModuleDict, images: torch.Tensor) -> torch.Tensor:
        """The posterior mean, unscaled, as diffusers' AutoencoderKL.encode(x).latent_dist.mean."""
        return networks["encoder"](images)[0]

    def decode(self, networks: nn.ModuleDict, latents: torch.Tensor) -> torch.Tensor:
        """As diffusers' AutoencoderKL.decode(z).sample."""
        return networks["decoder"](latents)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||grad nll|| / (||grad g_loss|| + 1e-4) at the decoder's last layer, clamped to [0, 1e4]; a constant."""
    nll_gradient = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_gradient = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(nll_gradient) / (torch.linalg.vector_norm(g_gradient) + ADAPTIVE_WEIGHT_EPS)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def wide(tensor: torch.Tensor) -> torch.Tensor:
    """The loss's terms in float32 at least: bf16 sums over every pixel of a batch lose the small terms."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()
