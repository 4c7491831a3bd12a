"""The model plugin contract, and how plugins are found.

A plugin is a class registered under the entry point group ``pipeline.plugins``::

    # the plugin package's pyproject.toml
    [project.entry-points."pipeline.plugins"]
    mymodel = "mypackage.mymodel:MyModel"

and selected with ``plugin: mymodel`` in the run config. The trainer uses it like this::

    plugin = MyModel(options, image)          # options: the config's `model:` mapping; image: ImageInfo
    networks = plugin.build_networks()        # {"encoder": nn.Module, ...}: what gets optimised
    settings = plugin.optimizer_defaults()    # {"name": "rmsprop", "lr": 3e-4, ..., "<network>": {"lr": ...}}
    # every micro-batch, networks in train mode:
    output = plugin.training_step(networks, images, labels, step)     # -> StepOutput
    # for grids, networks in eval mode, under torch.no_grad():
    plugin.sample(networks, count, generator)  -> images      (optional: a plugin that can sample)
    plugin.reconstruct(networks, images)       -> images      (optional: a plugin that can reconstruct)
    # with every checkpoint: plugin.state_dict() / plugin.load_state_dict(state)  (JSON-able)
    # optional, state too large for JSON (the VAE-GAN's historical average), the same on every rank:
    # plugin.state_tensors() -> {name: tensor}, saved as plugin_state.safetensors (not exported);
    # plugin.load_state_tensors(tensors, networks) on resume ({} from a checkpoint without the file;
    # ValueError when they do not fit)
    # optional, for `pipeline interpolate` and `pipeline attribute-vector` (eval mode, no_grad):
    plugin.encode(networks, images) -> codes (N x D)      plugin.decode(networks, codes) -> images
    # optional, which networks sit out this optimizer step (the VAE-GAN's equilibrium, a discriminator
    # before it starts): at every step's last micro-batch, after its forward and before its backward,
    plugin.networks_to_skip(totals, step) -> {"discriminator", ...}    # step: optimizer steps done so far
    # (a plugin written before `step` was given may define networks_to_skip(totals): then it is called
    # only at steps with totals)
    # optional, frozen networks a loss needs (LPIPS's VGG16), from files the user names: the trainer reads
    # each (safetensors), records its sha256 in config.json, places what build_auxiliary returns on the
    # device in the run's dtype and eval mode, and never optimises, checkpoints or exports it
    plugin.auxiliary_files() -> {name: Path}
    plugin.build_auxiliary({name: {key: tensor}}) -> {name: nn.Module}     # kept by the plugin for its loss
    # optional, a fresh run's starting weights (a diffusers folder to fine-tune; never on resume):
    plugin.initial_weights() -> Path | None      # a safetensors file, which the trainer reads
    plugin.initial_state(tensors) -> {network: state_dict}    # each loaded whole into its network
    # optional: the options as validated, defaults included (what a weights folder's config.json records)
    plugin.resolved_options() -> dict          # else options_class(**options).model_dump(), or the options

The rules:

- ``StepOutput.loss`` is ONE scalar whose gradient with respect to each network's parameters is
  exactly that network's own loss gradient. When losses cross networks (a GAN), build every network's
  own loss from one forward pass and return ``own_gradients(networks, {"encoder": ..., ...})``: it
  differentiates each loss with ``torch.autograd.grad`` with respect to its own network only, and
  returns a loss whose backward hands those gradients over. The trainer then runs one backward and
  one optimizer step for all networks (docs/design.md says why).
- Losses are means over the batch, so that a gradient does not depend on the micro-batch size:
  DeepSpeed averages gradients over accumulation steps and ranks.
- ``metrics`` holds detached scalars to log (each loss term, say); the trainer averages them. A metric
  may first appear late (a discriminator's, from the step it starts): it is logged from then on.
- ``ImageInfo`` gives the image side, its channels and the data set's label names (None without labels).
- ``step_totals`` holds detached scalar SUMS (a cost summed over images, and the count of images, say).
  The trainer adds each up over every micro-batch of every rank in the optimizer step, and at the step's
  last micro-batch hands the global totals, as floats and identical on every rank, to
  ``networks_to_skip`` (called at every step, with {} when the plugin keeps no totals). The networks it
  names take no optimizer step at all this step: their weights and
  their optimizer state stay exactly as they were (the optimizer skips parameters without a gradient;
  under fp16 an overflow check and gradient clipping still see their gradients). So a decision made from
  the global batch is the same on every rank, whatever the number of ranks and micro-batches.
- A plugin class may name ``ema_networks``: the networks whose weights `ema.decay` averages unless the
  run config's ``ema.networks`` names others (those users sample and encode with: a GAN's discriminator
  needs none). Unnamed: every network.
- A plugin class may name ``defaults_before_recording``: the option defaults that weights folders written
  before config.json recorded every option (no "options_recorded" key) were trained with; loading such a
  folder fills them in for options it does not name.
- Devices and dtypes. The networks sit on the trainer's device (a GPU, or the CPU) in the run's dtype
  (float32, or bfloat16/float16 under mixed precision). ``training_step`` gets images already there, as
  float tensors N x C x H x W in [-1, 1], and labels (int64, -1 where the data set has none) on the same
  device. ``sample`` gets a CPU ``torch.Generator`` (seeded: the same grid on every device): draw the
  noise on the CPU with it, then move the noise to a parameter's device and dtype
  (``torch.randn(n, d, generator=g).to(weight.device, weight.dtype)``). Noise in ``training_step`` comes
  from torch's global RNG on the networks' device (``torch.randn_like``): the trainer seeds it per rank
  and checkpoints it. ``reconstruct``, ``encode`` and ``decode`` get tensors on the networks' device.
  Apart from its own noise, a plugin moves nothing between devices: networks, batches and checkpoints
  are the trainer's.
- A plugin never imports accelerate or DeepSpeed and never reads or writes files.
- Under ``own_gradients`` the returned ``StepOutput.loss`` is a zero: its value means nothing, only its
  backward does. Put the losses to watch in ``metrics``.
- Raise ``PluginError`` for bad options: the user sees its message as one line.
- What a plugin can do is what it defines: ``sample``, ``reconstruct``, and ``encode`` with ``decode``
  are optional (a GAN has no reconstruction). The trainer checks the required methods at start-up; grids,
  `pipeline sample` / `reconstruct` / `interpolate` / `attribute-vector` and `pipeline evaluate` use what
  exists and say in one line what a plugin cannot do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol

import torch
from torch import nn

from pipeline.errors import PluginError

ENTRY_POINT_GROUP = "pipeline.plugins"


@dataclass(frozen=True)
class ImageInfo:
    size: int
    channels: int
    labels: tuple[str, ...] | None = None  # the data set's label names, label i the i-th (None: no labels)


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    step_totals: dict[str, torch.Tensor] = field(default_factory=dict)


class _GivenGradients(torch.autograd.Function):
    """A zero whose backward gives each parameter a gradient computed beforehand, times the incoming
    gradient (DeepSpeed scales the loss: by 1/accumulation steps, and by the fp16 loss scale)."""

    @staticmethod
    def forward(ctx, gradients: tuple[torch.Tensor, ...], *parameters: torch.Tensor) -> torch.Tensor:
        ctx.gradients = gradients
        return parameters[0].new_zeros(())

    @staticmethod
    def backward(ctx, incoming: torch.Tensor) -> tuple[None, ...] | tuple[torch.Tensor, ...]:
        if bool(incoming == 1):  # no scaling (one micro-batch a step, no fp16): spare a pass over them all
            return (None, *ctx.gradients)
        return (None, *(gradient * incoming for gradient in ctx.gradients))


def own_gradients(networks: nn.ModuleDict, losses: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """The step's loss for networks trained by different losses: each network's gradient is that of its
    own entry in `losses` (a network absent or None there gets a zero gradient this micro-batch), taken
    with torch.autograd.grad over the one forward pass that built them all, so shared passes are run
    once and no loss leaks into another network's parameters. Networks given the same loss tensor (an
    autoencoder's encoder and decoder) are differentiated together, in one backward pass."""
    own = {name: [p for p in network.parameters() if p.requires_grad] for name, network in networks.items()}
    groups: dict[int, list[str]] = {}  # networks by the loss tensor they minimise
    for name in networks:
        if losses.get(name) is not None:
            groups.setdefault(id(losses[name]), []).append(name)
    found: dict[str, tuple[torch.Tensor | None, ...]] = {name: (None,) * len(own[name]) for name in networks}
    for index, names in enumerate(groups.values()):
        together = [p for name in names for p in own[name]]
        last = index == len(groups) - 1  # the graph is kept until the last loss is differentiated
        grads = iter(torch.autograd.grad(losses[names[0]], together, retain_graph=not last, allow_unused=True))
        for name in names:
            found[name] = tuple(next(grads) for _ in own[name])
    parameters = [p for name in networks for p in own[name]]
    gradients = [
        torch.zeros_like(p) if g is None else g
        for name in networks
        for p, g in zip(own[name], found[name], strict=True)
    ]
    return _GivenGradients.apply(tuple(gradients), *parameters)


class ModelPlugin(Protocol):
    def __init__(self, options: dict[str, Any], image: ImageInfo) -> None: ...

    def build_networks(self) -> dict[str, nn.Module]: ...

    def optimizer_defaults(self) -> dict[str, Any]: ...

    def training_step(
        self, networks: nn.ModuleDict, images: torch.Tensor, labels: torch.Tensor, step: int
    ) -> StepOutput: ...

    def sample(self, networks: nn.ModuleDict, count: int, generator: torch.Generator) -> torch.Tensor: ...

    def reconstruct(self, networks: nn.ModuleDict, images: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


REQUIRED = ("build_networks", "optimizer_defaults", "training_step", "state_dict", "load_state_dict")
OPTIONAL = ("sample", "reconstruct", "encode", "decode")


def capabilities(plugin: object) -> frozenset[str]:
    """The optional methods this plugin defines (module docstring)."""
    return frozenset(name for name in OPTIONAL if callable(getattr(plugin, name, None)))


def check_required(plugin: object, name: str) -> None:
    missing = [method for method in REQUIRED if not callable(getattr(plugin, method, None))]
    if missing:
        raise PluginError(f"plugin {name}: {type(plugin).__name__} has no {missing[0]}() (pipeline/plugin.py)")


def require(plugin: object, ability: str) -> None:
    """For a command that needs an optional method: one line when the plugin lacks it."""
    if ability not in capabilities(plugin):
        raise PluginError(f"the {type(plugin).__name__} plugin cannot {ability} (it has no {ability}())")


def resolved_options(plugin: ModelPlugin, options: dict[str, Any]) -> dict[str, Any]:
    """The plugin's options as validated, defaults included: what a weights folder records, so that its
    meaning does not change when a default does."""
    if hasattr(plugin, "resolved_options"):
        return plugin.resolved_options()
    parsed = getattr(plugin, "options", None)
    if hasattr(parsed, "model_dump"):
        return parsed.model_dump(mode="json")
    return dict(options)


def options_of_folder(plugin_class: type, description: dict[str, Any]) -> dict[str, Any]:
    """The options a weights folder's model was trained with (config.json's description): recorded whole
    since "options_recorded"; before that, the options it names over the defaults of that time."""
    if description.get("options_recorded"):
        return description["model"]
    return {**getattr(plugin_class, "defaults_before_recording", {}), **description["model"]}


def installed_plugins() -> dict[str, EntryPoint]:
    return {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}


def load_plugin_class(name: str) -> type:
    plugins = installed_plugins()
    if name not in plugins:
        known = ", ".join(sorted(plugins)) or "none"
        raise PluginError(f"no plugin named {name!r} is installed (installed: {known}); see `pipeline plugins`")
    return plugins[name].load()


def describe(point: EntryPoint) -> str:
    """The first line of the plugin class's docstring, without importing anything heavy twice."""
    try:
        doc = point.load().__doc__ or ""
    except Exception as error:  # a broken third-party plugin must not break the listing
        return f"(fails to import: {error})"
    return doc.strip().splitlines()[0] if doc.strip() else ""
