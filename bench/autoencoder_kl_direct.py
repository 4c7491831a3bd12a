"""The `autoencoder-kl` update written as directly as plain PyTorch allows, two ways, the baselines of
`bench/train_step.py --autoencoder-kl`:

- `SingleForward`: what the pipeline's step computes (one forward, each network's own loss differentiated
  with torch.autograd.grad, two Adams: the autoencoder's and the discriminator's);
- `Alternating`: latent diffusion's update in Lightning (ldm/models/autoencoder.py): the autoencoder's
  step with the discriminator frozen, then a second forward of the autoencoder (frozen, a fresh posterior
  draw) for the discriminator's step.
Both at disc_start 0 (every term on), with the plugin's loss functions (adaptive weight, hinge)."""

from __future__ import annotations

import torch

from pipeline.plugins.autoencoder_kl import adaptive_weight, discriminator_loss


def adam(modules: list[torch.nn.Module], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for m in modules for p in m.parameters()], lr=lr, betas=(0.5, 0.9))


class SingleForward:
    def __init__(self, plugin, networks: torch.nn.ModuleDict, lr: float = 2e-4) -> None:
        self.plugin, self.networks = plugin, networks
        self.autoencoder = adam([networks["encoder"], networks["decoder"]], lr)
        self.discriminator = adam([networks["discriminator"]], lr)

    def step(self, images: torch.Tensor) -> None:
        losses, _ = self.plugin.own_losses(self.networks, images, step=10**9)
        autoencoder = [p for name in ("encoder", "decoder") for p in self.networks[name].parameters()]
        discriminator = list(self.networks["discriminator"].parameters())
        for parameters, loss, retain in (
            (autoencoder, losses["encoder"], True),
            (discriminator, losses["discriminator"], False),
        ):
            for parameter, grad in zip(
                parameters, torch.autograd.grad(loss, parameters, retain_graph=retain), strict=True
            ):
                parameter.grad = grad
        self.autoencoder.step()
        self.discriminator.step()


class Alternating:
    def __init__(self, plugin, networks: torch.nn.ModuleDict, lr: float = 2e-4) -> None:
        self.plugin, self.networks = plugin, networks
        self.autoencoder = adam([networks["encoder"], networks["decoder"]], lr)
        self.discriminator = adam([networks["discriminator"]], lr)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_variance = self.networks["encoder"](images)
        z = mean + torch.exp(0.5 * log_variance) * torch.randn(mean.shape, dtype=mean.dtype)
        return self.networks["decoder"](z), mean, log_variance

    def step(self, images: torch.Tensor) -> None:
        options = self.plugin.options
        encoder, decoder, discriminator = (self.networks[n] for n in ("encoder", "decoder", "discriminator"))
        discriminator.requires_grad_(False)  # Lightning's toggle_optimizer
        reconstruction, mean, log_variance = self.forward(images)
        hidden, logits = discriminator.features(reconstruction)
        rec = (images - reconstruction).abs()
        if self.plugin.feature_loss:
            real = discriminator.features(images)[0].detach()
            rec = rec + options.perceptual_weight * (hidden - real).pow(2).flatten(1).mean(1)[:, None, None, None]
        nll = rec.sum() / len(images)
        kl = 0.5 * (mean.pow(2) + log_variance.exp() - 1 - log_variance).sum() / len(images)
        g_loss = -logits.mean()
        weight = adaptive_weight(nll, g_loss, decoder.last_layer) * options.disc_weight
        self.autoencoder.zero_grad()
        (nll + options.kl_weight * kl + weight * options.disc_factor * g_loss).backward()
        self.autoencoder.step()
        discriminator.requires_grad_(True)
        encoder.requires_grad_(False), decoder.requires_grad_(False)
        reconstruction, _, _ = self.forward(images)  # LDM's second training_step: the forward again
        d_loss = discriminator_loss(options.disc_loss, discriminator(images), discriminator(reconstruction))
        self.discriminator.zero_grad()
        (options.disc_factor * d_loss).backward()
        self.discriminator.step()
        encoder.requires_grad_(True), decoder.requires_grad_(True)
