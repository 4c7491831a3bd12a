"""The VAE-GAN through the real trainer: one backward gives each network exactly its own loss's gradient,
with no loss leaking into another network; the equilibrium decides from the global costs. (The plugin's
gradients and running statistics against the authors' graph itself: tests/test_vaegan_authors_graph.py.)
Under separate batches the own losses are written out here from PAPER.md, independently of the plugin."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_vaegan_authors_graph import authors_update, scale

from pipeline.plugin import ImageInfo
from pipeline.plugins.networks import gaussian_kl
from pipeline.plugins.vaegan import VAEGAN

EPS = 1e-3


def small_vaegan(**options) -> tuple[VAEGAN, torch.nn.ModuleDict]:
    plugin = VAEGAN({"latent_size": 8, "fc_size": 32, **options}, ImageInfo(32, 1))
    torch.manual_seed(0)
    return plugin, torch.nn.ModuleDict(plugin.build_networks()).double()


def batch() -> torch.Tensor:
    return torch.rand(6, 1, 32, 32, dtype=torch.float64) * 2 - 1


LEAKS = {  # misroutings, each a plausible bug: the real-path test shows it would see every one
    "llike_trains_the_discriminator": "discriminator",
    "gan_trains_the_encoder": "encoder",
    "decoder_without_llike": "decoder",
}


def own_losses(networks, images, noise, prior_noise, gamma: float, leaks: tuple[str, ...] = ()) -> dict:
    """Each network's loss under separate batches, as PAPER.md states it (saturating, reconstructions
    discriminated), from one plain forward pass (or with LEAKS). The authors cut the GAN's gradient at
    the latent; `gan_trains_the_encoder` is the plausible bug of not cutting it."""
    mu, log_variance = networks["encoder"](images)
    z = mu + noise * (0.5 * log_variance).exp()
    gan_z = z if "gan_trains_the_encoder" in leaks else z.detach()
    real_logit, real_features = networks["discriminator"](images)
    recon_features = networks["discriminator"](networks["decoder"](z))[1]
    recon_logit = networks["discriminator"](networks["decoder"](gan_z))[0]
    fake_logit = torch.cat([networks["discriminator"](networks["decoder"](prior_noise))[0], recon_logit])
    d = torch.sigmoid
    llike = 0.5 * (recon_features - real_features).pow(2).flatten(1).sum(1).mean()
    fake_loss = -torch.log(1 - d(fake_logit) + EPS).mean()  # over every generated image
    losses = {
        "encoder": gaussian_kl(mu, log_variance).mean() + llike,
        "decoder": gamma * llike - fake_loss,
        "discriminator": 0.5 * -torch.log(d(real_logit) + EPS).mean() + 0.5 * fake_loss,
    }
    if "llike_trains_the_discriminator" in leaks:
        losses["discriminator"] = losses["discriminator"] + llike
    if "gan_trains_the_encoder" in leaks:
        losses["encoder"] = losses["encoder"] - fake_loss
    if "decoder_without_llike" in leaks:
        losses["decoder"] = -fake_loss
    return losses


@pytest.mark.slow
def test_joint_batches_change_the_discriminators_gradient() -> None:
    """The two batchings are different models (PAPER.md), not two spellings of one."""
    gradients = {}
    for batches in ("joint", "separate"):
        plugin, networks = small_vaegan(discriminator_batches=batches)
        torch.manual_seed(1)
        plugin.routed_loss(networks, batch())[0].backward()
        gradients[batches] = torch.cat([p.grad.flatten() for p in networks["discriminator"].parameters()])
    cosine = torch.nn.functional.cosine_similarity(gradients["joint"], gradients["separate"], dim=0)
    assert cosine < 0.9, float(cosine)


def test_equilibrium_decides_from_the_global_costs() -> None:
    plugin, _ = small_vaegan(equilibrium=True)

    def totals(real: float, fake: float) -> dict[str, float]:  # 8 real and 16 generated images
        return {"real_cost": 8 * real, "real_images": 8.0, "fake_cost": 16 * fake, "fake_images": 16.0}

    # discriminator far too good (real cost tiny): it sits out
    assert plugin.networks_to_skip(totals(0.1, 0.5)) == {"discriminator"}
    # discriminator far too bad (a cost above 0.68 + 0.35): the decoder sits out
    assert plugin.networks_to_skip(totals(1.5, 0.7)) == {"decoder"}
    # both would sit out: both step
    assert plugin.networks_to_skip(totals(0.1, 1.5)) == set()
    assert plugin.networks_to_skip(totals(0.7, 0.7)) == set()
    assert plugin.state_dict() == {"skipped": {"discriminator": 1, "decoder": 1}}
    # equilibrium off: no totals kept, nothing skipped
    plugin, networks = small_vaegan()
    assert plugin.routed_loss(networks, batch())[2] == {}


def test_equilibrium_totals_are_sums_over_every_image_seen() -> None:
    plugin, networks = small_vaegan(equilibrium=True)
    torch.manual_seed(1)
    _, metrics, totals = plugin.routed_loss(networks, batch())
    assert (totals["real_images"], totals["fake_images"]) == (6, 12)  # prior samples and reconstructions
    torch.testing.assert_close(float(totals["real_cost"] / 6), float(metrics["real_cost"]))
    torch.testing.assert_close(float(totals["fake_cost"] / 12), float(metrics["fake_cost"]))


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return float((value.double() - exact).norm() / exact.norm())


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


RANKS, MICRO_STEPS, MICRO_BATCH, SEED = 2, 2, 8, 7
LR = 1e6  # the step dwarfs the weights, so (before - after) / lr loses no digits


def one_trainer_step(tmp_path: Path, model: dict) -> tuple[torch.nn.ModuleDict, dict, list]:
    """accelerate launch, 2 ranks, ZeRO-2, 2 micro-batches each, one SGD step at lr 1e6, which applies
    -lr x the mean of the 4 micro-batch gradients. Returns the initial networks, each network's applied
    gradient (flat), and the 4 micro-batches' (images, reparameterisation noise, prior noise) as the
    trainer drew them."""
    from accelerate.utils import set_seed
    from trainer_helpers import run_small_vaegan, weights

    from pipeline.data.stream import StreamLayout, epoch_order
    from shards.read.random_access import SplitDataset
    from shards.read.reader import open_split

    shards = run_small_vaegan(tmp_path, model, MICRO_BATCH, max_steps=1, optimizer={"name": "sgd", "lr": LR}, seed=SEED)
    after = weights(tmp_path / "run")

    set_seed(SEED)
    initial = torch.nn.ModuleDict(VAEGAN(model, ImageInfo(32, 1)).build_networks())  # every rank's start
    applied = {
        name: torch.cat([((p.detach() - after[name][key]) / LR).flatten() for key, p in network.named_parameters()])
        for name, network in initial.items()
    }
    split = open_split(shards)
    counts = tuple(s["count"] for s in split.shards)
    layout = StreamLayout(counts, SEED, 8, world_size=RANKS, batch_size=MICRO_BATCH)
    order, dataset = list(epoch_order(layout, 0)), SplitDataset(split)
    micro_batches = []
    for rank in range(RANKS):
        torch.manual_seed(SEED + rank)  # the trainer's per-rank stream (set_seed(seed, device_specific=True))
        for micro_step in range(MICRO_STEPS):
            start = micro_step * RANKS * MICRO_BATCH + rank * MICRO_BATCH
            images = torch.stack([dataset[i][0] for i in order[start : start + MICRO_BATCH]])
            micro_batches.append((images, torch.randn(MICRO_BATCH, 8), torch.randn(MICRO_BATCH, 8)))
    return initial, applied, micro_batches


def mean_gradients(initial, micro_batches, dtype: torch.dtype, gradients_of) -> dict[str, torch.Tensor]:
    """Each network's gradient averaged over the step's micro-batches, computed in `dtype`;
    `gradients_of(networks, images, noise, prior_noise)` gives one micro-batch's, per network."""
    totals = {name: 0.0 for name in initial}
    for inputs in micro_batches:
        networks = copy.deepcopy(initial).to(dtype)
        for name, gradient in gradients_of(networks, *(tensor.to(dtype) for tensor in inputs)).items():
            totals[name] = totals[name] + gradient / len(micro_batches)
    return totals


def float32_bounds(initial, micro_batches, exact: dict, gradients_of) -> tuple[dict[str, float], list[dict]]:
    """The trainer computes in float32, and at initialisation this model is ill-conditioned (batch norm with
    the authors' eps 1e-6 over 8 samples): its float32 gradient is off by up to ~1e-3 on some CPUs and
    thread counts, and not by the same amount on another machine. So the bound is measured here, on this
    CPU: 10x the float32 error of the same gradient computed in the test with 1 and with 2 threads."""
    float32_gradients = []
    for count in (1, 2):
        with threads(count):
            float32_gradients.append(mean_gradients(initial, micro_batches, torch.float32, gradients_of))
    bounds = {
        name: 10 * max(1e-7, *(relative_error(gradients[name], exact[name]) for gradients in float32_gradients))
        for name in exact
    }
    return bounds, float32_gradients


@pytest.mark.slow
def test_the_real_training_path_applies_each_networks_own_gradient(tmp_path) -> None:
    """Separate batches, the saturating decoder loss, gamma 0.05 (L_llike a visible share of the
    decoder's gradient, so that losing it is seen): each network's applied gradient must be its own
    loss's, averaged.

    The float32 bound alone cannot tell every misrouting of LEAKS apart: the GAN's gradient leaking into
    the encoder moves it by ~1e-3, as much as float32's error on some batches. So each leak is looked for
    along its own direction (leaked - exact): the share of it in the trainer's gradient is 0 without the
    leak and 1 with it, and float32's error, measured the same way in the test, must look like at most a
    tenth of a leak. The trainer's share must be under a half."""
    model = {"latent_size": 8, "fc_size": 32, "gamma": 0.05, "discriminator_batches": "separate"}
    initial, applied, micro_batches = one_trainer_step(tmp_path, model)

    def own_gradients(*leaks: str):
        def gradients_of(networks, images, noise, prior_noise) -> dict[str, torch.Tensor]:
            losses = own_losses(networks, images, noise, prior_noise, model["gamma"], leaks)
            return {
                name: torch.cat(
                    [
                        g.flatten()
                        for g in torch.autograd.grad(loss, list(networks[name].parameters()), retain_graph=True)
                    ]
                )
                for name, loss in losses.items()
            }

        return gradients_of

    exact = mean_gradients(initial, micro_batches, torch.float64, own_gradients())
    bounds, float32_gradients = float32_bounds(initial, micro_batches, exact, own_gradients())
    # each leak changes only its own network's loss (and, with separate batches, no pass): one run of all
    # three gives each network's gradient under its own leak
    leaked = mean_gradients(initial, micro_batches, torch.float64, own_gradients(*LEAKS))

    def leak_share(gradient: torch.Tensor, network: str) -> float:
        direction = leaked[network] - exact[network]
        return float((gradient.double() - exact[network]) @ direction / (direction @ direction))

    for leak, network in LEAKS.items():
        noise = max(abs(leak_share(gradients[network], network)) for gradients in float32_gradients)
        print(f"{leak}: float32's error looks like {noise:.2e} of it")
        assert 10 * noise < 1, (leak, noise)
    for name in initial:
        error = relative_error(applied[name], exact[name])
        print(f"{name}: trainer's error {error:.2e}, bound {bounds[name]:.2e}")
        assert error < bounds[name], (name, error, bounds[name])
    for leak, network in LEAKS.items():
        share = leak_share(applied[network], network)
        print(f"{leak}: share of it in the trainer's gradient {share:.2e}")
        assert abs(share) < 0.5, (leak, share)


STABILITY = {  # the options of Salimans et al. that look across samples, in one run
    "generator_loss": "feature_matching",
    "label_smoothing": 0.9,
    "minibatch_discrimination": {"kernels": 4, "kernel_dims": 3},
}


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, STABILITY], ids=["defaults", "stability_options"])
def test_the_real_training_path_under_joint_batches_is_the_authors_update(tmp_path, options: dict) -> None:
    """Joint batches, the authors' gamma; the defaults (saturating), and feature matching with label
    smoothing and minibatch discrimination: the gradient the trainer applies to each network is
    model/aegan.py's (tests/test_vaegan_authors_graph.py, with the paper's equations for the options),
    averaged over the micro-batches, to within float32's own error measured on this CPU. So feature
    matching's means and minibatch discrimination's comparisons span one rank's micro-batch: the
    reference computes each micro-batch alone. Before the two joint-batch terms were corrected, the
    trainer was 0.53 (encoder) and 0.43 (decoder) off."""
    model = {"latent_size": 8, "fc_size": 32, **options}
    initial, applied, micro_batches = one_trainer_step(tmp_path, model)
    extra = {}
    if options:
        extra = {"generator": "feature_matching", "real_target": 0.9, "minibatch": True}

    def gradients_of(networks, images, noise, prior_noise) -> dict[str, torch.Tensor]:
        gradients = authors_update(networks, images, noise, prior_noise, recon_gan=True, batches="joint", **extra)
        return {
            name: torch.cat([g.flatten() for g in grads]) / scale(name, recon_gan=True, batch=len(images))
            for name, grads in gradients.items()
        }

    exact = mean_gradients(initial, micro_batches, torch.float64, gradients_of)
    bounds, _ = float32_bounds(initial, micro_batches, exact, gradients_of)
    for name in initial:
        error = relative_error(applied[name], exact[name])
        print(f"{name}: trainer's error {error:.2e}, bound {bounds[name]:.2e}")
        assert error < min(bounds[name], 0.05), (name, error, bounds[name])
