"""The VAE-GAN of Larsen et al. (2016): encoder, decoder and discriminator, each trained by its own loss.

| network       | minimises                                                         |
|---------------|-------------------------------------------------------------------|
| encoder       | L_prior + L_llike                                                 |
| decoder       | gamma * L_llike + mean over generated images of log(1 - Dis(.))  |
|               |   (joint batches: + mean over real images of log Dis(x), below)   |
| discriminator | 0.5 * mean over real of -log Dis(x) + 0.5 * mean over generated of -log(1 - Dis(.)) |

(the decoder's GAN term as written is the authors' saturating loss; `generator_loss: non_saturating`
uses -log Dis(.) instead. eps 1e-3 inside every log, as the authors. L_llike's target Dis_l(x) is a
constant: `feature_likelihood`.)

Conventions, once. Every loss is a mean over the batch of per-example sums: L_prior is the KL summed
over latent dimensions, L_llike = 0.5 x the squared distance of the Dis_l features summed over them.
The authors (model/aegan.py) sum every term over the batch instead, and weigh the decoder's gradient
as w x grad(L_llike) + (1 - w) x grad(GAN) with w = `recon_vs_gan_weight` = 1e-6 (celeba_aegan.py).
Both of their terms are batch sums, so the batch size cancels; with our means, and the GAN term a mean
over all S x B generated images (S generated sets: prior samples, plus reconstructions when they are
discriminated), the same weighting is

    gamma = w / ((1 - w) x S)          w = 1e-6: gamma = 1e-6 (S = 1), 5e-7 (S = 2)

which is gamma's default. (Before this was worked out, the plugin used 6.4e-5, 64 to 128 times larger.)

One forward pass builds all three losses; `own_gradients` (pipeline/plugin.py) differentiates each
with respect to its own network only and hands the gradients to the trainer's one backward. So no
loss can leak into another network, nothing runs twice, and gamma weighs L_llike in the decoder's loss
directly, with no gradient rescaling at the latent.

Batch norm batches (`discriminator_batches`):
- `joint` (default, the authors'): Enc(x); x~ = Dec(z); Dis_l([x~, x]) for L_llike; the generated
  images Dec([z, z_p]) (or Dec(z_p) without reconstructions discriminated); Dis([x, generated]) for
  the GAN terms. Batch statistics are joint over each concatenated batch. Running statistics move as
  in the authors' code: in Enc(x), Dec(z) and Dis([x, generated]); the other two passes run through
  their shared-weight copies, whose statistics nothing uses. The shared statistics open two gradient
  paths, and model/aegan.py decides each (tests/test_vaegan_authors_graph.py rebuilds its graph):
  - L_llike's target Dis_l(x), which depends on x~ through the statistics, is a constant: deeppy's
    Gaussian likelihood back-propagates into its prediction only, so no gradient reaches the encoder
    or the decoder through it.
  - The decoder's GAN term covers the discriminator's whole batch: aegan.py hands the decoder the
    reversed gradient of the discriminator's whole loss on [x, generated], so log Dis(x), which depends
    on the generated images through the statistics, is in it with coefficient 1 (mean log(Dis(x) + eps)).
    For `non_saturating`, which the authors do not have, the decoder minimises that whole loss with
    every label swapped: mean -log Dis(generated) + mean -log(1 - Dis(x)); each reduces to the
    familiar generated-only term when the statistics are not shared.
- `separate`: each pass alone, each moving the running statistics, in this order: Enc(x), Dec(z_p),
  Dis(x), Dis(x_p), Dec(z), Dis(x~); L_llike and the GAN terms share Dis(x) and Dis(x~). Neither path
  above exists: no real image's output depends on a generated one.

Equilibrium (the authors' balance, off by default): after the whole global batch of a step (every rank,
every micro-batch), real_cost = mean over real images of -log Dis(x) and fake_cost = the mean over every
generated image the discriminator saw of -log(1 - Dis(.)). Either below target - margin: the
discriminator takes no optimizer step; either above target + margin: the decoder takes none; both: both
step. The encoder always steps. The trainer makes the decision once per step, the same on every rank,
from these sums (`step_totals`, `networks_to_skip`); a network that sits out keeps its weights and its
optimizer state exactly.

Training stability, the options of Salimans et al. (2016), each off by default (docs/plugins.md, "Training
stability"): `label_smoothing` (gan_terms.py), `generator_loss: feature_matching` (gan_terms.py),
`minibatch_discrimination` (networks.MinibatchDiscrimination: each row compared within its own set of the
rank's micro-batch), `historical_averaging` (historical_average.py: state kept by checkpoints through
`state_tensors`). Virtual batch normalisation is not offered (docs/plugins.md says why).

Needs ZeRO stage 0-2 (parameters must be whole on each rank).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from pipeline.config.fields import Flag, Integer, Number
from pipeline.plugin import ImageInfo, StepOutput, own_gradients
from pipeline.plugins.gan_terms import discriminator_cost, generated_term, real_rows_term
from pipeline.plugins.historical_average import HistoricalAverage
from pipeline.plugins.networks import (
    Decoder,
    Discriminator,
    Encoder,
    gaussian_kl,
    reparameterise,
    running_statistics_frozen,
)
from pipeline.plugins.vae import GaussianLatentModel

AUTHORS_RECON_VS_GAN_WEIGHT = 1e-6  # celeba_aegan.py's w


class Passes(NamedTuple):
    """What one micro-batch's forward passes give the losses."""

    reconstruction: torch.Tensor  # x~ = Dec(z)
    real_features: torch.Tensor  # Dis_l(x)
    reconstruction_features: torch.Tensor  # Dis_l(x~)
    real_logit: torch.Tensor
    fake_logit: torch.Tensor  # every generated image the discriminator saw
    real_hidden: torch.Tensor  # the discriminator's last hidden layer (feature matching)
    fake_hidden: torch.Tensor


def authors_gamma(generated_sets: int, weight: float = AUTHORS_RECON_VS_GAN_WEIGHT) -> float:
    """gamma that weighs L_llike against the GAN term as the authors' `recon_vs_gan_weight` does."""
    return weight / ((1 - weight) * generated_sets)


class MinibatchOptions(BaseModel):
    """Minibatch discrimination (Salimans et al. 3.2): B kernels of C dimensions each."""

    model_config = ConfigDict(extra="forbid")
    kernels: Integer = Field(100, gt=0, le=4096)
    kernel_dims: Integer = Field(5, gt=0, le=1024)


class VAEGANOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latent_size: Integer = Field(128, gt=0, le=4096)
    fc_size: Integer = Field(
        2048, gt=0, le=65536, description="encoder FC: 2048 in the paper, 1024 in the authors' code"
    )
    gamma: Number | None = Field(
        None, gt=0, description="weight of L_llike in the decoder's loss; default: the authors' w = 1e-6 (docstring)"
    )
    discriminate_reconstructions: Flag = Field(True, description="the paper's third GAN term (authors' code: off)")
    discriminator_batches: Literal["joint", "separate"] = "joint"
    generator_loss: Literal["saturating", "non_saturating", "feature_matching"] = "saturating"
    label_smoothing: Number | None = Field(
        None, gt=0, lt=1, description="one-sided: the real images' target in the discriminator's loss (0.9)"
    )
    minibatch_discrimination: MinibatchOptions | None = None
    historical_averaging: Number | None = Field(
        None, gt=0, description="weight of ||theta - mean of past theta||^2 in the decoder's and discriminator's loss"
    )
    log_eps: Number = Field(1e-3, ge=0, description="added inside the GAN logs, as the authors")
    equilibrium: Flag = Field(False, description="the authors' balance: the stronger side sits out a step")
    equilibrium_target: Number = 0.68
    equilibrium_margin: Number = 0.35

    @model_validator(mode="after")
    def _authors_gamma_by_default(self) -> VAEGANOptions:
        if self.gamma is None:
            self.gamma = authors_gamma(2 if self.discriminate_reconstructions else 1)
        return self


# Before options were recorded whole (config.json without "options_recorded"), a weights folder held
# only the options its run config set; these were the defaults it was trained with.
DEFAULTS_BEFORE_RECORDING = {"gamma": 6.4e-5, "discriminator_batches": "separate"}


class VAEGAN(GaussianLatentModel):
    """The paper's VAE-GAN: learned similarity (discriminator features) for the VAE's likelihood."""

    name, options_class = "vaegan", VAEGANOptions
    defaults_before_recording = DEFAULTS_BEFORE_RECORDING

    def __init__(self, options: dict[str, Any], image: ImageInfo) -> None:
        super().__init__(options, image)
        self.skipped = {"discriminator": 0, "decoder": 0}  # steps each sat out (equilibrium), in checkpoints
        weight = self.options.historical_averaging
        self.history = HistoricalAverage(("decoder", "discriminator"), weight) if weight else None

    def build_networks(self) -> dict[str, nn.Module]:
        size, channels, latent = self.image.size, self.image.channels, self.options.latent_size
        minibatch = self.options.minibatch_discrimination
        return {
            "encoder": Encoder(size, channels, latent, self.options.fc_size),
            "decoder": Decoder(size, channels, latent),
            "discriminator": Discriminator(
                size,
                channels,
                minibatch_kernels=minibatch.kernels if minibatch else None,
                minibatch_kernel_dims=minibatch.kernel_dims if minibatch else 5,
            ),
        }

    def optimizer_defaults(self) -> dict[str, Any]:
        # the authors': deeppy's RMSProp (decay 0.9, eps 1e-8), weight decay 1e-5 on every layer
        return {"name": "rmsprop", "lr": 3e-4, "alpha": 0.9, "eps": 1e-8, "weight_decay": 1e-5}

    def routed_loss(
        self, networks: nn.ModuleDict, images: torch.Tensor, step: int | None = None
    ) -> tuple[torch.Tensor, dict, dict]:
        """One loss whose gradient is, for each network, the gradient of its own loss (module docstring);
        the metrics; and the equilibrium's cost sums. `step`: the optimizer step (historical averaging)."""
        losses, metrics, totals = self.own_losses(networks, images, step)
        return own_gradients(networks, losses), metrics, totals

    def own_losses(
        self, networks: nn.ModuleDict, images: torch.Tensor, step: int | None = None
    ) -> tuple[dict, dict, dict]:
        """Each network's own loss, from one forward pass; detached metrics; the equilibrium's sums."""
        mu, log_variance = networks["encoder"](images)
        z = reparameterise(mu, log_variance)
        prior_z = torch.randn_like(z)
        options, eps = self.options, self.options.log_eps
        joint = options.discriminator_batches == "joint"
        passes = (self._joint_passes if joint else self._separate_passes)(networks, images, z, prior_z)
        real_target = options.label_smoothing or 1.0
        real_cost = discriminator_cost(passes.real_logit, 1.0, eps)  # per image; the equilibrium's, unsmoothed
        fake_cost = discriminator_cost(passes.fake_logit, 0.0, eps)
        real_loss = real_cost if real_target == 1 else discriminator_cost(passes.real_logit, real_target, eps)
        gen = generated_term(options.generator_loss, passes.fake_logit, passes.real_hidden, passes.fake_hidden, eps)
        prior = gaussian_kl(mu, log_variance).mean()
        llike = feature_likelihood(passes.reconstruction_features, passes.real_features)
        dis = 0.5 * real_loss.mean() + 0.5 * fake_cost.mean()
        decoder_gan = gen
        real_rows = real_rows_term(options.generator_loss, passes.real_logit, real_target, eps) if joint else None
        if real_rows is not None:
            decoder_gan = gen + real_rows
        losses = {"encoder": prior + llike, "decoder": options.gamma * llike + decoder_gan, "discriminator": dis}
        reconstruction = passes.reconstruction
        penalties = self._historical_penalties(networks, step)
        for name, penalty in penalties.items():
            losses[name] = losses[name] + penalty
        metrics = {
            "prior": prior,
            "llike": llike,
            "gen": gen,
            "dis": dis,
            "real_cost": real_cost.mean(),
            "fake_cost": fake_cost.mean(),
            "mse": (reconstruction.float() - images.float()).pow(2).mean(),
            **{f"history/{name}": penalty for name, penalty in penalties.items()},
        }
        totals = {}
        if self.options.equilibrium:
            totals = {
                "real_cost": real_cost.detach().double().sum(),
                "real_images": torch.tensor(float(len(real_cost)), dtype=torch.float64, device=real_cost.device),
                "fake_cost": fake_cost.detach().double().sum(),
                "fake_images": torch.tensor(float(len(fake_cost)), dtype=torch.float64, device=fake_cost.device),
            }
        return losses, {name: value.detach() for name, value in metrics.items()}, totals

    def _historical_penalties(self, networks: nn.ModuleDict, step: int | None) -> dict[str, torch.Tensor]:
        """Historical averaging's term of each player's loss (historical_average.py), the average moved
        first when `step` is a new one."""
        if self.history is None:
            return {}
        if step is not None:
            self.history.observe(networks, step)
        if not self.history.means:
            return {}
        return {name: self.history.penalty(networks[name], name) for name in self.history.names}

    def _joint_passes(self, networks: nn.ModuleDict, images: torch.Tensor, z: torch.Tensor, prior_z: torch.Tensor):
        """The authors' passes (module docstring): concatenated batches, joint batch statistics."""
        decoder, discriminator = networks["decoder"], networks["discriminator"]
        count = len(images)
        reconstruction = decoder(z)
        with running_statistics_frozen(discriminator):
            reconstruction_features, real_features = discriminator.features(torch.cat([reconstruction, images])).split(
                count
            )
        # the GAN's gradient stops at the latent: the encoder never sees it (own_gradients also ensures it)
        codes = torch.cat([z.detach(), prior_z]) if self.options.discriminate_reconstructions else prior_z
        with running_statistics_frozen(decoder):
            generated = decoder(codes)
        # minibatch discrimination compares each row with its own set's: real, reconstructions, prior samples
        out = discriminator.classify(torch.cat([images, generated]), [count] * (1 + len(codes) // count))
        return Passes(
            reconstruction,
            real_features,
            reconstruction_features,
            out.logit[:count],
            out.logit[count:],
            out.hidden[:count],
            out.hidden[count:],
        )

    def _separate_passes(self, networks: nn.ModuleDict, images: torch.Tensor, z: torch.Tensor, prior_z: torch.Tensor):
        """Every pass alone, each moving the running statistics (module docstring)."""
        decoder, discriminator = networks["decoder"], networks["discriminator"]
        prior_samples = decoder(prior_z)
        real = discriminator.classify(images)
        prior = discriminator.classify(prior_samples)
        reconstruction = decoder(z)
        rebuilt = discriminator.classify(reconstruction)
        fakes = [prior, rebuilt] if self.options.discriminate_reconstructions else [prior]
        return Passes(
            reconstruction,
            real.features,
            rebuilt.features,
            real.logit,
            torch.cat([fake.logit for fake in fakes]),
            real.hidden,
            torch.cat([fake.hidden for fake in fakes]),
        )

    def training_step(
        self, networks: nn.ModuleDict, images: torch.Tensor, labels: torch.Tensor, step: int
    ) -> StepOutput:
        loss, metrics, totals = self.routed_loss(networks, images, step)
        return StepOutput(loss=loss, metrics=metrics, step_totals=totals)

    def networks_to_skip(self, totals: dict[str, float], step: int | None = None) -> set[str]:
        """The authors' equilibrium, from the costs of the step's whole global batch (module docstring)."""
        if not self.options.equilibrium or not totals.get("real_images") or not totals.get("fake_images"):
            return set()
        costs = (totals["real_cost"] / totals["real_images"], totals["fake_cost"] / totals["fake_images"])
        skip = equilibrium_skips(costs, self.options.equilibrium_target, self.options.equilibrium_margin)
        for network in skip:
            self.skipped[network] += 1
        return skip

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = {name: int(state["skipped"][name]) for name in ("discriminator", "decoder")}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The historical average (pipeline/plugin.py: tensors a checkpoint keeps beside the weights)."""
        return self.history.state_tensors() if self.history is not None else {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], networks: nn.ModuleDict) -> None:
        if self.history is not None:
            self.history.load_state_tensors(tensors, networks)


def feature_likelihood(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_llike: half the squared distance of the Dis_l features, summed over them, a mean over the batch.
    The target is a constant, as deeppy's Gaussian likelihood in model/aegan.py, which back-propagates into
    its prediction only: under joint batches Dis_l(x) depends on x~ through the batch statistics, and that
    path must not reach the encoder or the decoder."""
    return 0.5 * (prediction - target.detach()).pow(2).flatten(1).sum(1).mean()


def equilibrium_skips(costs: tuple[float, float], target: float, margin: float) -> set[str]:
    """model/aegan.py's GradientDescent.train_epoch: which of discriminator and decoder sit out."""
    skip = set()
    if any(cost < target - margin for cost in costs):
        skip.add("discriminator")
    if any(cost > target + margin for cost in costs):
        skip.add("decoder")
    return set() if len(skip) == 2 else skip
