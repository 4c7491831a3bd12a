"""A trained model from Python, and the one loader of weights folders that the model commands and
`pipeline evaluate` use too::

    from pipeline import load_model, to_pil
    model = load_model("runs/demo/checkpoints/latest", weights="ema", device="cpu")
    images = model.sample(16, seed=0)             # N x C x H x W in [-1, 1]
    codes = model.encode(images)                   # posterior means, N x D
    again = model.decode(codes)
    pairs = model.reconstruct(images)
    to_pil(images)[0].save("first.png")

A weights folder is a checkpoint (OUTPUT/checkpoints/latest) or what `pipeline export` wrote from one.
Images go in as the models take them (float N x C x H x W in [-1, 1]) or as users hold them: PIL images,
uint8 arrays (H x W, H x W x C or N x H x W x C) and uint8 tensors (N x C x H x W); they must have the
model's size (`model.image`). Loading reads safetensors only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.checkpoints import checkpoint
from pipeline.checkpoints.weights import load_weights, read_description
from pipeline.plugin import ImageInfo, ModelPlugin, PluginError, load_plugin_class, options_of_folder, require
from pipeline.training.ema import SUFFIX as EMA_SUFFIX
from pipeline.training.ema import ema_file, folder_has_ema
from shards.errors import UserError
from shards.reader import tensor_to_image, to_unit_range

ImagesIn = torch.Tensor | np.ndarray | Image.Image | Sequence[Image.Image]
WEIGHTS = ("ema", "raw")


@dataclass
class Model:
    plugin: ModelPlugin
    networks: nn.ModuleDict  # in eval mode
    image: ImageInfo
    weights: str  # what was loaded: "ema" (each averaged network's EMA, the others' raw weights) or "raw"

    @property
    def device(self) -> torch.device:
        return next(self.networks.parameters()).device

    @torch.no_grad()
    def sample(self, count: int, seed: int = 0) -> torch.Tensor:
        """`count` images from the prior, N x C x H x W in [-1, 1]; the same for a seed on any device."""
        require(self.plugin, "sample")
        return self.plugin.sample(self.networks, count, torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def encode(self, images: ImagesIn) -> torch.Tensor:
        """Posterior means, N x D."""
        require(self.plugin, "encode")
        return self.plugin.encode(self.networks, self.as_batch(images))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        require(self.plugin, "decode")
        return self.plugin.decode(self.networks, torch.as_tensor(codes).to(self.device, torch.float32))

    @torch.no_grad()
    def reconstruct(self, images: ImagesIn) -> torch.Tensor:
        require(self.plugin, "reconstruct")
        return self.plugin.reconstruct(self.networks, self.as_batch(images))

    def as_batch(self, images: ImagesIn) -> torch.Tensor:
        """Images as the networks take them: float N x C x H x W in [-1, 1] on the model's device."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, Sequence) and not isinstance(images, torch.Tensor | np.ndarray):
            mode = "L" if self.image.channels == 1 else "RGB"
            images = np.stack(
                [np.asarray(image.convert(mode)).reshape(image.height, image.width, -1) for image in images]
            )
        if isinstance(images, np.ndarray):
            images = _array_to_pixels(images)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images: a tensor, a uint8 array or PIL images, not {type(images).__name__}")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        expected = (self.image.channels, self.image.size, self.image.size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            wanted = " x ".join(map(str, expected))
            raise ValueError(f"images of shape {tuple(images.shape)}: this model takes N x {wanted}")
        images = images.to(self.device)
        return to_unit_range(images) if images.dtype == torch.uint8 else images.float()


def _array_to_pixels(array: np.ndarray) -> torch.Tensor:
    """A uint8 array as images are held (H x W, H x W x C, N x H x W x C) to uint8 N x C x H x W."""
    if array.dtype != np.uint8:
        raise ValueError(f"an array of {array.dtype}: give uint8 pixels (or a float tensor in [-1, 1])")
    if array.ndim == 2:
        array = array[None, :, :, None]
    elif array.ndim == 3:
        array = array[None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def load_model(
    folder: str | Path, weights: Literal["ema", "raw"] | None = None, device: str | torch.device = "cpu"
) -> Model:
    """The model of a weights folder, in eval mode on `device`. weights: "ema" (the EMA weights a run with
    `ema.decay` saved), "raw", or None: EMA when the folder has them."""
    folder = Path(folder)
    description = read_description(folder)
    if weights not in (None, *WEIGHTS):
        raise UserError(f"weights: ema or raw, not {weights!r}")
    has_ema = folder_has_ema(folder)
    if weights == "ema" and not has_ema:
        raise UserError(f"{folder}: has no EMA weights (*{EMA_SUFFIX}: train with ema.decay set); use weights raw")
    chosen = weights or ("ema" if has_ema else "raw")
    name, image = description["plugin"], ImageInfo(description["image"]["size"], description["image"]["channels"])
    try:
        plugin_class = load_plugin_class(name)
        plugin = plugin_class(options_of_folder(plugin_class, description), image)
    except (ValueError, TypeError) as error:  # a plugin rejecting its options (or the image) its own way
        raise PluginError(f"{folder / checkpoint.CONFIG_FILE}: {name}: {error}") from None
    networks = nn.ModuleDict(plugin.build_networks())
    load_weights(networks, folder, name)
    if chosen == "ema":
        averaged = nn.ModuleDict({key: net for key, net in networks.items() if (folder / ema_file(key)).exists()})
        load_weights(averaged, folder, name, EMA_SUFFIX)
    return Model(plugin, networks.to(device).eval(), image, chosen)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """N x C x H x W (or one C x H x W) in [-1, 1] to PIL images."""
    return [tensor_to_image(image) for image in (images.unsqueeze(0) if images.ndim == 3 else images)]
