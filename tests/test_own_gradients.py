"""pipeline.plugin.own_gradients: each network gets the gradient of its own loss and nothing else, a
network without a loss gets zeros, and the incoming gradient (DeepSpeed's loss scaling) multiplies all."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.plugin import own_gradients


def crossing_networks() -> tuple[nn.ModuleDict, dict[str, torch.Tensor]]:
    """A generator and a critic whose losses both run through both networks, like a GAN's."""
    torch.manual_seed(0)
    networks = nn.ModuleDict({"generator": nn.Linear(3, 4), "critic": nn.Linear(4, 1)}).double()
    fake = networks["generator"](torch.randn(5, 3, dtype=torch.float64))
    score = networks["critic"](fake)
    return networks, {"generator": -score.mean(), "critic": score.pow(2).mean() + fake.pow(2).sum()}


def test_each_network_gets_its_own_losss_gradient_only() -> None:
    networks, losses = crossing_networks()
    expected = {
        name: torch.autograd.grad(losses[name], list(networks[name].parameters()), retain_graph=True)
        for name in networks
    }
    both = losses["generator"] + losses["critic"]  # what a plain backward of the sum would give the generator
    leaky = torch.autograd.grad(both, networks["generator"].weight, retain_graph=True)[0]
    loss = own_gradients(networks, losses)
    assert loss.item() == 0.0
    loss.backward()
    for name, network in networks.items():
        for parameter, wanted in zip(network.parameters(), expected[name], strict=True):
            torch.testing.assert_close(parameter.grad, wanted, rtol=1e-12, atol=0)
    # the critic's loss depends on the generator too (fake.pow(2)): none of that reached it
    assert not torch.allclose(networks["generator"].weight.grad, leaky)


def test_a_network_without_a_loss_gets_zeros_and_the_incoming_gradient_scales() -> None:
    networks, losses = crossing_networks()
    expected = torch.autograd.grad(losses["critic"], list(networks["critic"].parameters()), retain_graph=True)
    (own_gradients(networks, {"generator": None, "critic": losses["critic"]}) * 0.25).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in networks["generator"].parameters())
    for parameter, wanted in zip(networks["critic"].parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, 0.25 * wanted, rtol=1e-12, atol=0)
