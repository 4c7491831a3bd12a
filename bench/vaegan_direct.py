"""The VAE-GAN update written as directly as plain PyTorch allows, at the plugin's defaults (the authors'
joint discriminator batches, reconstructions discriminated): one forward pass, each network's own loss
differentiated with torch.autograd.grad, one RMSProp per network (weight decay 1e-5). The baseline for
the pipeline's routed step in bench/train_step.py."""

from __future__ import annotations

import torch

EPS = 1e-3


def frozen(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Its batch norms, switched to batch statistics without updating their running ones."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.track_running_stats = False
    return norms


def thaw(norms: list[torch.nn.Module]) -> None:
    for norm in norms:
        norm.track_running_stats = True


class DirectVAEGAN:
    def __init__(self, networks: torch.nn.ModuleDict, gamma: float, lr: float = 3e-4) -> None:
        self.networks, self.gamma = networks, gamma
        self.optimizers = {
            name: torch.optim.RMSprop(net.parameters(), lr=lr, alpha=0.9, eps=1e-8, weight_decay=1e-5)
            for name, net in networks.items()
        }

    def step(self, images: torch.Tensor, latent: int) -> None:
        encoder, decoder, discriminator = (self.networks[n] for n in ("encoder", "decoder", "discriminator"))
        count = len(images)
        mu, log_variance = encoder(images)
        z = mu + torch.randn_like(mu) * (0.5 * log_variance).exp()
        reconstruction = decoder(z)
        norms = frozen(discriminator)
        features = discriminator.features(torch.cat([reconstruction, images]))
        thaw(norms)
        norms = frozen(decoder)
        generated = decoder(torch.cat([z.detach(), torch.randn(count, latent, device=images.device)]))
        thaw(norms)
        logits, _ = discriminator(torch.cat([images, generated]))
        d = torch.sigmoid
        kl = 0.5 * (mu.pow(2) + log_variance.exp() - 1 - log_variance).sum(1).mean()
        llike = 0.5 * (features[:count] - features[count:]).pow(2).flatten(1).sum(1).mean()
        fake = -torch.log(1 - d(logits[count:]) + EPS).mean()
        dis = 0.5 * -torch.log(d(logits[:count]) + EPS).mean() + 0.5 * fake
        own = {"encoder": kl + llike, "decoder": self.gamma * llike - fake, "discriminator": dis}
        for index, (name, loss) in enumerate(own.items()):
            parameters = list(self.networks[name].parameters())
            grads = torch.autograd.grad(loss, parameters, retain_graph=index < 2)
            for parameter, grad in zip(parameters, grads, strict=True):
                parameter.grad = grad
        for optimizer in self.optimizers.values():
            optimizer.step()
