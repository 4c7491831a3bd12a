"""The `vae` plugin's loss is the paper's negative ELBO with a pixel-wise Gaussian likelihood of std
`pixel_sigma` (its docstring and options), as a mean over the batch of per-example sums (the plugin
contract, pipeline/plugin.py). The reference is written out here from that convention, in float64,
independently of the plugin and of pipeline/plugins/networks.py."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.plugin import ImageInfo
from pipeline.plugins.vae import VAE

LATENT = 8

# By the dtype of the plugin's loss: the plugin computes it with .float(), which turns float64 down to
# float32 (measured: 3e-7 at worst, relative), so 1e-10 applies only once it keeps float64. A sum over the
# batch instead of a mean is off by a factor of the batch size; a KL twice too large, by 5e-5 and 5e-2.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def small_vae(**options) -> tuple[VAE, torch.nn.ModuleDict]:
    plugin = VAE({"latent_size": LATENT, "fc_size": 32, **options}, ImageInfo(32, 1))
    torch.manual_seed(0)
    return plugin, torch.nn.ModuleDict(plugin.build_networks()).double()


def batch() -> torch.Tensor:
    return torch.rand(6, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2 - 1


def draws(count: int) -> torch.Tensor:
    """The plugin's one random draw, the reparameterisation noise."""
    torch.manual_seed(1)
    return torch.randn(count, LATENT, dtype=torch.float64)


def negative_elbo(networks, images: torch.Tensor, noise: torch.Tensor, sigma: float) -> dict[str, torch.Tensor]:
    """Per example: -log N(x | x~, sigma^2 I) without its constant (D log(sigma sqrt(2 pi)), no gradient),
    plus KL(N(mu, diag(s^2)) || N(0, I)) in closed form; both averaged over the batch."""
    mu, log_variance = networks["encoder"](images)
    reconstruction = networks["decoder"](mu + noise * torch.exp(log_variance / 2))
    squared_error = (images - reconstruction) ** 2
    nll = squared_error.sum(dim=(1, 2, 3)) / (2 * sigma**2)
    kl = 0.5 * (torch.exp(log_variance) + mu**2 - 1 - log_variance).sum(dim=1)
    return {"loss": (nll + kl).mean(), "nll": nll.mean(), "kl": kl.mean(), "mse": squared_error.mean()}


def relative_error(got: torch.Tensor, wanted: torch.Tensor) -> float:
    return float((got.double() - wanted).norm() / wanted.norm().clamp_min(1e-30))


def step(plugin: VAE, networks: torch.nn.ModuleDict, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The plugin's training step and one backward of its loss, as the trainer runs them (the gradients
    arrive the same way if the plugin routes them with own_gradients)."""
    torch.manual_seed(1)
    output = plugin.training_step(networks, images, torch.full((len(images),), -1), step=0)
    output.loss.backward()
    return output.loss.detach(), output.metrics


@pytest.mark.parametrize("sigma", [0.1, 3.0], ids=["default-sigma", "kl-comparable"])
def test_the_loss_and_gradients_are_the_negative_elbo_averaged_over_the_batch(sigma: float) -> None:
    """sigma 0.1 (the default): the likelihood dominates; 3.0: the KL's gradient in the encoder is of the
    same size as the likelihood's, so a wrong KL shows too (mu.bias sees only the KL: the decoder's batch
    norm removes a shift of z)."""
    plugin, networks = small_vae(pixel_sigma=sigma)
    reference = copy.deepcopy(networks)
    images = batch()
    loss, metrics = step(plugin, networks, images)

    wanted = negative_elbo(reference, images, draws(len(images)), sigma)
    tolerance = TOLERANCE[loss.dtype]
    written_out = {name: value.detach() for name, value in wanted.items()}
    values = [("loss", loss, written_out["loss"])] + [(f"metrics.{n}", metrics[n], v) for n, v in written_out.items()]
    for name, value, expected in values:
        assert relative_error(value, expected) < tolerance, (name, float(value), float(expected))
    for name, network in networks.items():
        gradients = torch.autograd.grad(wanted["loss"], list(reference[name].parameters()), retain_graph=True)
        for (key, parameter), expected in zip(network.named_parameters(), gradients, strict=True):
            error = relative_error(parameter.grad, expected)
            assert error < tolerance, (name, key, error)
    assert all(p.grad.abs().sum() > 0 for network in networks.values() for p in network.parameters())


def test_the_same_images_twice_give_the_same_loss_and_gradients() -> None:
    """A batch mean does not see a batch repeated (batch norm's statistics do not either). The posterior's
    variance is set to ~0 (log-variance -200) so that the noise, drawn anew for the copies, changes no z."""
    plugin, once = small_vae()
    with torch.no_grad():
        once["encoder"].log_variance.weight.zero_()
        once["encoder"].log_variance.bias.fill_(-200.0)
    twice = copy.deepcopy(once)
    images = batch()
    loss, metrics = step(plugin, once, images)
    loss_twice, metrics_twice = step(plugin, twice, torch.cat([images, images]))

    tolerance = TOLERANCE[loss.dtype]
    values = [("loss", loss, loss_twice)] + [(f"metrics.{n}", value, metrics_twice[n]) for n, value in metrics.items()]
    for name, value, repeated in values:
        assert relative_error(repeated, value.double()) < tolerance, (name, float(value), float(repeated))
    for name in once:
        pairs = zip(once[name].named_parameters(), twice[name].parameters(), strict=True)
        for (key, parameter), repeated in pairs:
            error = relative_error(repeated.grad, parameter.grad)
            assert error < tolerance, (name, key, error)
