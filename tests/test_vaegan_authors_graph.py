"""The VAE-GAN plugin against the authors' own computation: model/aegan.py's graph rebuilt in float64
autograd from andersbll/autoencoding_beyond_pixels (model/aegan.py, model/util.py, model/ae.py) and
deeppy's mechanics, not from the plugin's losses.

What each part of `authors_update` follows:
- `AEGAN.__init__`: `decoder.params = [WeightedParameter(p, w, -(1 - w))]`, `decoder_neggrad = deepcopy
  (decoder)` with `p.share()`d parameters; `discriminator_recon = deepcopy` of the discriminator's first
  `recon_depth` layers, its parameters `WeightedParameter(p, 1.0, 0.0)`. A deepcopy keeps batch norm
  running statistics of its own, and a shared parameter keeps a gradient of its own until
  `WeightedParameter.grad()` (model/util.py) adds `weight x own + shared_weight x share`. Here: each
  copy is a `copy.deepcopy` whose gradients are combined the same way (`combined_gradients`).
- `AEGAN.setup`, line by line: `enc = encoder(x_src)`; `latent_encoder.encode` (model/ae.py
  NormalEncoder: z = mu + exp(0.5 logvar) eps, KLDStandardNormal); `x_tilde = decoder(z)`;
  `d = discriminator_recon(Concatenate(x_tilde, x_src))`, `d_x_tilde, d_x = Slices`,
  `recon_error(d_x_tilde, d_x)` (NLLNormal: its bprop writes the prediction's gradient only);
  `z = ScaleGradient(0.0)(z)`; `z = Concatenate(z, z_samples)` (reconstructions discriminated) or
  `z_samples`; `x = decoder_neggrad(z)`; `x = Concatenate(x_src, x)`; `ScaleGradient(dis_weights_inv)`
  on x; `d = discriminator(x)`; `ScaleGradient(dis_weights)` on d; `gan_loss = log(d * sign + offset +
  eps)`; `loss = sum(loss) - sum(gan_loss)`, one backward.
- `GradientDescent.reset`/`train_epoch`: the encoder's and latent encoder's, the decoder's and the
  discriminator's parameters are stepped with those gradients (the shares have no state of their own).

Where the authors have no such setting, the rebuild states its own, marked as such:
- `separate` batches: every Concatenate above replaced by passes of their own (no shared statistics).
- `non_saturating`: the decoder's share (decoder_neggrad) takes the gradient of the discriminator's
  loss with every label swapped instead of the reversed gradient of that loss.

The plugin writes its losses as batch means, the authors as batch sums with the decoder's gradient
weighted w / (1 - w): `SCALE` converts one into the other (the plugin's docstring derives gamma from it).
"""

from __future__ import annotations

import copy

import pytest
import torch

import pipeline.plugins.vaegan as vaegan_module
from pipeline.plugin import ImageInfo
from pipeline.plugins.vaegan import VAEGAN

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')

W = 1e-6  # celeba_aegan.py: recon_vs_gan_weight
REAL_VS_GEN = 0.5  # celeba_aegan.py: real_vs_gen_weight
EPS = 1e-3  # AEGAN's eps
BATCH, LATENT = 6, 8
KERNELS, KERNEL_DIMS = 4, 3  # minibatch discrimination, small


class ScaleGradient(torch.autograd.Function):
    """model/util.py ScaleGradient: the identity forward, the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class NLLNormal(torch.autograd.Function):
    """model/ae.py NLLNormal, sigma 1: fprop sums c - 0.5 (pred - target)^2 over features; bprop writes
    (pred - target) x the incoming gradient into the prediction and nothing into the target."""

    @staticmethod
    def forward(ctx, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pred, target)
        c = -0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=pred.dtype))
        return (c - 0.5 * (pred - target) ** 2).flatten(1).sum(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pred, target = ctx.saved_tensors
        return (pred - target) * grad.view(-1, *[1] * (pred.dim() - 1)), None


def kld_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """model/ae.py KLDStandardNormal: -0.5 sum(1 + logvar - mu^2 - exp(logvar)) per example."""
    return -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)


def paper_minibatch_features(hidden: torch.Tensor, projection: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """Salimans et al. (2016) section 3.2, element by element: M_i = f(x_i) T (B x C); o(x_i)_b = sum over
    j of exp(-||M_i,b - M_j,b||_L1), j over x_i's own group (the rows of one set of one micro-batch)."""
    kernels = projection.shape[1] // KERNEL_DIMS
    matrices = (hidden @ projection).view(len(hidden), kernels, KERNEL_DIMS)
    rows, start = [], 0
    for size in groups:
        members = range(start, start + size)
        for i in members:
            rows.append(
                torch.stack(
                    [
                        sum(torch.exp(-(matrices[i, b] - matrices[j, b]).abs().sum()) for j in members)
                        for b in range(kernels)
                    ]
                )
            )
        start += size
    return torch.stack(rows)


def reference_discriminator(discriminator, batch: torch.Tensor, groups: list[int], minibatch: bool):
    """(Dis(.), the last hidden layer f) layer by layer, minibatch features by the paper's equation."""
    hidden = discriminator.head[:-1](discriminator.after_features(discriminator.features(batch)))
    last_input = hidden
    if minibatch:
        features = paper_minibatch_features(hidden, discriminator.minibatch.projection, groups)
        last_input = torch.cat([hidden, features], dim=1)
    return torch.sigmoid(discriminator.head[-1](last_input).squeeze(1)), hidden


def discriminator_outputs(discriminator, batches: list[torch.Tensor], groups: list[int], joint: bool, minibatch: bool):
    """Dis(.) and f on the concatenation (joint) or on each batch alone (separate); `groups`: each set's
    size, real first (minibatch discrimination compares within each)."""
    if joint:
        return reference_discriminator(discriminator, torch.cat(batches), groups, minibatch)
    outputs = [reference_discriminator(discriminator, batch, [len(batch)], minibatch) for batch in batches]
    return torch.cat([d for d, _ in outputs]), torch.cat([f for _, f in outputs])


def authors_update(
    networks,
    images,
    noise,
    prior_noise,
    *,
    recon_gan: bool,
    batches: str,
    generator: str = "saturating",
    real_target: float = 1.0,
    minibatch: bool = False,
):
    """aegan.py's graph on `networks` (module docstring); returns each network's gradient as
    GradientDescent steps it. With the options of Salimans et al. (ours, not the authors'): the real rows'
    log term smoothed to `real_target`; feature matching as the decoder's share's loss; minibatch
    discrimination before the discriminator's last layer."""
    joint = batches == "joint"
    encoder, decoder, discriminator = networks["encoder"], networks["decoder"], networks["discriminator"]
    decoder_neggrad, discriminator_recon = copy.deepcopy(decoder), copy.deepcopy(discriminator)
    count = len(images)
    mu, logvar = encoder(images)
    z = mu + torch.exp(0.5 * logvar) * noise
    loss = kld_standard_normal(mu, logvar)
    x_tilde = decoder(z)
    if joint:
        d_x_tilde, d_x = discriminator_recon.features(torch.cat([x_tilde, images])).split(count)
    else:
        d_x_tilde, d_x = discriminator_recon.features(x_tilde), discriminator_recon.features(images)
    loss = loss + NLLNormal.apply(d_x_tilde, d_x)
    z = ScaleGradient.apply(z, 0.0)
    codes = [z, prior_noise] if recon_gan else [prior_noise]
    gen_size = count * len(codes)
    generated = [decoder_neggrad(torch.cat(codes))] if joint else [decoder_neggrad(code) for code in codes]
    groups = [count] * (1 + len(codes))
    weights = torch.full((count + gen_size,), (1 - REAL_VS_GEN) * count / gen_size, dtype=images.dtype)
    weights[:count] = REAL_VS_GEN
    scaled = ScaleGradient.apply(torch.cat([images, *generated]), (1 / weights).view(-1, 1, 1, 1))
    parts = list(scaled.split([count, *[len(g) for g in generated]]))
    d, _ = discriminator_outputs(discriminator, parts, groups, joint, minibatch)
    d = ScaleGradient.apply(d, weights)
    sign = torch.ones(count + gen_size, dtype=images.dtype)
    sign[count:] = -1
    offset = torch.zeros_like(sign)
    offset[count:] = 1
    gan_loss = torch.log(d * sign + offset + EPS)
    # one-sided label smoothing: the real rows' log-likelihood of the target alpha
    gan_loss = torch.cat([smoothed(d[:count], real_target), gan_loss[count:]])
    total = loss.sum() - gan_loss.sum()
    neggrad_parameters = list(decoder_neggrad.parameters())
    if generator == "saturating":
        total.backward()
        neggrad = [p.grad for p in neggrad_parameters]
    elif generator == "non_saturating":  # ours: the share takes the swapped-label loss's gradient
        swapped = torch.cat([smoothed(d[:count], 1 - real_target), torch.log(d[count:] + EPS)])
        neggrad = torch.autograd.grad(swapped.sum(), neggrad_parameters, retain_graph=True)
        total.backward()
    else:  # feature matching, the paper's 3.1, through a copy of the discriminator (no gradient scaling)
        copy_batches = [images, *generated]
        _, hidden = discriminator_outputs(copy.deepcopy(discriminator), copy_batches, groups, joint, minibatch)
        matching = (hidden[:count].detach().mean(0) - hidden[count:].mean(0)).pow(2).sum()
        # in the share's convention (weight -(1 - w)), at the GAN term's scale S x B (plugin docstring)
        matched = torch.autograd.grad(matching, neggrad_parameters, retain_graph=True)
        neggrad = [-len(codes) * count * g for g in matched]
        total.backward()
    gradients = {
        "encoder": [p.grad for p in encoder.parameters()],
        "decoder": combined_gradients(decoder.parameters(), W, neggrad, -(1 - W)),
        "discriminator": combined_gradients(
            discriminator.parameters(), 1.0, [p.grad for p in discriminator_recon.parameters()], 0.0
        ),
    }
    return gradients


def smoothed(d: torch.Tensor, target: float) -> torch.Tensor:
    """log-likelihood of `target` under Dis: t log(Dis + eps) + (1 - t) log(1 - Dis + eps); aegan.py's real
    rows' log(Dis + eps) at t = 1."""
    if target == 1:
        return torch.log(d + EPS)
    return target * torch.log(d + EPS) + (1 - target) * torch.log(1 - d + EPS)


def combined_gradients(parameters, weight: float, shared: list, shared_weight: float) -> list[torch.Tensor]:
    """model/util.py WeightedParameter.grad: weight x own gradient + shared_weight x each share's (a
    parameter a pass never reached has no gradient: zero)."""
    combined = []
    own_shared = iter(shared)
    for parameter in parameters:
        share = next(own_shared, None)
        own = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        combined.append(weight * own + shared_weight * (torch.zeros_like(own) if share is None else share))
    return combined


def scale(network: str, recon_gan: bool, batch: int = BATCH) -> float:
    """Authors' gradient / plugin's gradient: sums over B images against means, and for the decoder
    also the (1 - w) x S that gamma = w / ((1 - w) S) divides out (S generated sets)."""
    sets = 2 if recon_gan else 1
    return batch * ((1 - W) * sets if network == "decoder" else 1.0)


def small_networks(options: dict | None = None) -> torch.nn.ModuleDict:
    plugin = VAEGAN(options or {"latent_size": LATENT, "fc_size": 32}, ImageInfo(32, 1))
    torch.manual_seed(0)
    return torch.nn.ModuleDict(plugin.build_networks()).double()


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, and the plugin's two draws in its order (reparameterisation noise, then prior samples)."""
    torch.manual_seed(2)
    images = torch.rand(BATCH, 1, 32, 32, dtype=torch.float64) * 2 - 1
    torch.manual_seed(1)
    return images, torch.randn(BATCH, LATENT, dtype=torch.float64), torch.randn(BATCH, LATENT, dtype=torch.float64)


def plugin_gradients(plugin: VAEGAN, networks) -> dict[str, list[torch.Tensor]]:
    images, _, _ = inputs()
    torch.manual_seed(1)
    loss, _, _ = plugin.routed_loss(networks, images)
    loss.backward()
    return {name: [p.grad for p in network.parameters()] for name, network in networks.items()}


def relative_errors(plugin_class: type, *, recon_gan: bool, batches: str, saturating: bool = True, **extra) -> dict:
    """Each network's relative error, plugin against the authors' graph, from the same initial weights.
    `extra`: generator ("feature_matching"), real_target (label smoothing), minibatch."""
    generator = extra.get("generator", "saturating" if saturating else "non_saturating")
    real_target, minibatch = extra.get("real_target", 1.0), extra.get("minibatch", False)
    options = {
        "latent_size": LATENT,
        "fc_size": 32,
        "discriminate_reconstructions": recon_gan,
        "discriminator_batches": batches,
        "generator_loss": generator,
        "label_smoothing": None if real_target == 1 else real_target,
        "minibatch_discrimination": {"kernels": KERNELS, "kernel_dims": KERNEL_DIMS} if minibatch else None,
    }
    initial = small_networks(options)
    ours, authors = copy.deepcopy(initial), copy.deepcopy(initial)
    got = plugin_gradients(plugin_class(options, ImageInfo(32, 1)), ours)
    wanted = authors_update(
        authors,
        *inputs(),
        recon_gan=recon_gan,
        batches=batches,
        generator=generator,
        real_target=real_target,
        minibatch=minibatch,
    )
    errors = {}
    for name in wanted:
        plugin_flat = torch.cat([g.flatten() for g in got[name]]) * scale(name, recon_gan)
        authors_flat = torch.cat([g.flatten() for g in wanted[name]])
        assert authors_flat.norm() > 0, name  # every network receives a gradient: the check is not vacuous
        errors[name] = float((plugin_flat - authors_flat).norm() / authors_flat.norm())
    return errors


@pytest.mark.parametrize("batches", ["joint", "separate"])
@pytest.mark.parametrize("saturating", [True, False], ids=["saturating", "non_saturating"])
@pytest.mark.parametrize("recon_gan", [True, False], ids=["recon_gan", "prior_only"])
def test_every_networks_gradient_is_the_authors(batches: str, saturating: bool, recon_gan: bool) -> None:
    errors = relative_errors(VAEGAN, recon_gan=recon_gan, batches=batches, saturating=saturating)
    assert max(errors.values()) < 1e-10, errors


class TargetNotConstant(VAEGAN):
    """Deviation 1 planted back: L_llike differentiated through its target Dis_l(x) too."""

    def own_losses(self, networks, images, step=None):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(
                vaegan_module,
                "feature_likelihood",
                lambda prediction, target: 0.5 * (prediction - target).pow(2).flatten(1).sum(1).mean(),
            )
            return super().own_losses(networks, images, step)


class GeneratedRowsOnly(VAEGAN):
    """Deviation 2 planted back: the decoder's GAN term over the generated rows only."""

    def own_losses(self, networks, images, step=None):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(vaegan_module, "real_rows_term", lambda *arguments: None)
            return super().own_losses(networks, images, step)


@pytest.mark.parametrize(
    ("mutant", "network", "saturating"),
    [
        (TargetNotConstant, "encoder", True),
        (GeneratedRowsOnly, "decoder", True),
        (GeneratedRowsOnly, "decoder", False),
    ],
)
def test_each_joint_batch_deviation_fails_the_reference(mutant: type, network: str, saturating: bool) -> None:
    errors = relative_errors(mutant, recon_gan=True, batches="joint", saturating=saturating)
    assert errors[network] > 1e-3, errors
    # and the reference is what tells them apart: under separate batches the same code is exact
    assert max(relative_errors(mutant, recon_gan=True, batches="separate", saturating=saturating).values()) < 1e-10


def statistics(networks) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.clone()
        for name, network in networks.items()
        for key, value in network.state_dict().items()
        if "running" in key or "num_batches" in key
    }


@pytest.mark.parametrize("batches", ["joint", "separate"])
def test_running_statistics_move_as_in_the_authors_passes(batches: str) -> None:
    """joint: aegan.py's graph moves the statistics used at test time in encoder(x_src), decoder(z) and
    discriminator([x_src, generated]); the copies' own statistics are dropped with them. separate (ours):
    every pass alone on the networks themselves, in the plugin's documented order."""
    initial = small_networks()
    ours, reference = copy.deepcopy(initial), copy.deepcopy(initial)
    plugin_gradients(
        VAEGAN({"latent_size": LATENT, "fc_size": 32, "discriminator_batches": batches}, ImageInfo(32, 1)), ours
    )
    images, noise, prior_noise = inputs()
    if batches == "joint":
        authors_update(reference, images, noise, prior_noise, recon_gan=True, batches="joint")
    else:
        with torch.no_grad():
            mu, log_variance = reference["encoder"](images)
            prior_samples = reference["decoder"](prior_noise)
            reference["discriminator"](images)
            reference["discriminator"](prior_samples)
            reconstruction = reference["decoder"](mu + noise * (0.5 * log_variance).exp())
            reference["discriminator"](reconstruction)
    moved, wanted, before = statistics(ours), statistics(reference), statistics(initial)
    assert any(not torch.equal(value, before[key]) for key, value in wanted.items())
    for key, value in wanted.items():
        torch.testing.assert_close(moved[key], value, rtol=1e-12, atol=1e-12, msg=key)
