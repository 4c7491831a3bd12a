"""The VAE-GAN update written as directly as plain PyTorch allows: one forward pass, each network's own
loss differentiated with torch.autograd.grad, one RMSProp per network. The baseline for the pipeline's
routed step in bench/train_step.py."""

from __future__ import annotations

import torch

EPS = 1e-3


class DirectVAEGAN:
    def __init__(self, networks: torch.nn.ModuleDict, gamma: float, lr: float = 3e-4) -> None:
        self.networks, self.gamma = networks, gamma
        self.optimizers = {
            name: torch.optim.RMSprop(net.parameters(), lr=lr, alpha=0.9, eps=1e-8) for name, net in networks.items()
        }

    def step(self, images: torch.Tensor, latent: int) -> None:
        encoder, decoder, discriminator = (self.networks[n] for n in ("encoder", "decoder", "discriminator"))
        mu, log_variance = encoder(images)
        z = mu + torch.randn_like(mu) * (0.5 * log_variance).exp()
        reconstruction, prior_samples = decoder(z), decoder(torch.randn(len(images), latent))
        real_logit, real_features = discriminator(images)
        recon_logit, recon_features = discriminator(reconstruction)
        prior_logit, _ = discriminator(prior_samples)
        d = torch.sigmoid
        kl = 0.5 * (mu.pow(2) + log_variance.exp() - 1 - log_variance).sum(1).mean()
        llike = 0.5 * (recon_features - real_features).pow(2).flatten(1).sum(1).mean()
        fakes = (prior_logit, recon_logit)
        generator = sum(torch.log(1 - d(logit) + EPS).mean() for logit in fakes) / 2
        dis = 0.5 * -torch.log(d(real_logit) + EPS).mean() + 0.25 * sum(
            -torch.log(1 - d(logit) + EPS).mean() for logit in fakes
        )
        own = {"encoder": kl + llike, "decoder": self.gamma * llike + generator, "discriminator": dis}
        for index, (name, loss) in enumerate(own.items()):
            parameters = list(self.networks[name].parameters())
            grads = torch.autograd.grad(loss, parameters, retain_graph=index < 2)
            for parameter, grad in zip(parameters, grads, strict=True):
                parameter.grad = grad
        for optimizer in self.optimizers.values():
            optimizer.step()
