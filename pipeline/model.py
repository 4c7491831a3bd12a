"""A trained model from Python, and the one loader of weights folders that the model commands and
`pipeline evaluate` use too::

    from pipeline import load_model, to_pil
    model = load_model("runs/demo/checkpoints/latest", weights="ema", device="cpu")
    images = model.sample(16, seed=0)             # N x C x H x W in [-1, 1]
    codes = model.encode(images)                   # posterior means, N x D (N x C x h x w: a latent map)
    again = model.decode(codes)
    pairs = model.reconstruct(images)
    to_pil(images)[0].save("first.png")

A weights folder is a checkpoint (OUTPUT/checkpoints/latest) or what `pipeline export` wrote from one.
Loading reads safetensors only. The rules of the arguments, each checked (a `ModelInputError`, a
ValueError, when one is broken; the model commands print it as one line):
- images go in as the models take them, float tensors N x C x H x W (or C x H x W) with every value
  finite and in [-1, 1], or as users hold them: PIL images (any mode, converted as `shards build`
  converts: 16-bit grayscale scaled by 1/256, transparency onto white), uint8 arrays (H x W, H x W x C or
  N x H x W x C) and uint8 tensors (N x C x H x W); no other dtype (bool, int32, ...); they must have the
  model's size and channels (`model.image`);
- `sample(count, seed)`: count a whole number from 1 to MAX_DRAW a call (more: call again, with another
  seed), seed a whole number from 0 to 2^63 - 1;
- `decode(codes)`: finite float codes of the shape `encode` gives, N x `model.code_shape` (D for the VAE-GAN,
  C x h x w for `autoencoder-kl`, whose codes are diffusers' `latent_dist.mean`, unscaled).
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
from pipeline.checkpoints.ema import SUFFIX as EMA_SUFFIX
from pipeline.checkpoints.ema import ema_file, folder_has_ema
from pipeline.checkpoints.weights import load_weights, read_description
from pipeline.errors import ModelInputError, PluginError
from pipeline.plugin import ImageInfo, ModelPlugin, load_plugin_class, options_of_folder, require
from shards.build.imageops import to_mode
from shards.errors import UserError
from shards.read.reader import tensor_to_image, to_unit_range

ImagesIn = torch.Tensor | np.ndarray | Image.Image | Sequence[Image.Image]
WEIGHTS = ("ema", "raw")
MAX_DRAW = 2**16  # images one sample() call may draw: a bound on what it allocates


def whole_number(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
        raise ModelInputError(f"{name}: a whole number from {low} to {high:,}, not {value!r}")
    return int(value)


@dataclass
class Model:
    plugin: ModelPlugin
    networks: nn.ModuleDict  # in eval mode
    image: ImageInfo
    weights: str  # what was loaded: "ema" (each averaged network's EMA, the others' raw weights) or "raw"
    _code_shape: tuple[int, ...] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.networks.parameters()).device

    @torch.no_grad()
    def sample(self, count: int, seed: int = 0) -> torch.Tensor:
        """`count` images from the prior, N x C x H x W in [-1, 1]; the same for a seed on any device."""
        require(self.plugin, "sample")
        count, seed = whole_number("count", count, 1, MAX_DRAW), whole_number("seed", seed, 0, 2**63 - 1)
        return self.plugin.sample(self.networks, count, torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def encode(self, images: ImagesIn) -> torch.Tensor:
        """Posterior means, N x `code_shape`."""
        require(self.plugin, "encode")
        return self.plugin.encode(self.networks, self.as_batch(images))

    @property
    def code_shape(self) -> tuple[int, ...]:
        """The shape of one code `encode` gives and `decode` takes (measured once, on a blank image)."""
        if self._code_shape is None:
            blank = torch.zeros(1, self.image.channels, self.image.size, self.image.size)
            self._code_shape = tuple(self.encode(blank).shape[1:])
        return self._code_shape

    @property
    def code_size(self) -> int:
        """The numbers in one code: D of the N x D codes of a plugin with flat codes."""
        return int(np.prod(self.code_shape))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        require(self.plugin, "decode")
        codes = torch.as_tensor(codes)
        if not codes.is_floating_point() or tuple(codes.shape[1:]) != self.code_shape or codes.ndim < 2:
            shape = " x ".join(map(str, self.code_shape))
            raise ModelInputError(
                f"codes of shape {tuple(codes.shape)} ({codes.dtype}): this model decodes float N x {shape}"
            )
        if not torch.isfinite(codes).all():
            raise ModelInputError("codes: some are not finite (NaN or infinite)")
        return self.plugin.decode(self.networks, codes.to(self.device, torch.float32))

    @torch.no_grad()
    def reconstruct(self, images: ImagesIn) -> torch.Tensor:
        require(self.plugin, "reconstruct")
        return self.plugin.reconstruct(self.networks, self.as_batch(images))

    def as_batch(self, images: ImagesIn) -> torch.Tensor:
        """Images as the networks take them: float N x C x H x W in [-1, 1] on the model's device."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, Sequence) and not isinstance(images, torch.Tensor | np.ndarray):
            images = np.stack([self._pixels_of(image) for image in images]) if images else np.zeros((0, 0, 0, 0))
        if isinstance(images, np.ndarray):
            images = _array_to_pixels(images)
        if not isinstance(images, torch.Tensor):
            raise ModelInputError(f"images: a tensor, a uint8 array or PIL images, not {type(images).__name__}")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        expected = (self.image.channels, self.image.size, self.image.size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected or len(images) == 0:
            wanted = " x ".join(map(str, expected))
            raise ModelInputError(f"images of shape {tuple(images.shape)}: this model takes N x {wanted}, N >= 1")
        if images.dtype == torch.uint8:
            return to_unit_range(images.to(self.device))
        if not images.is_floating_point():
            raise ModelInputError(f"images of {images.dtype}: give uint8 pixels or floats in [-1, 1]")
        if not torch.isfinite(images).all() or images.min() < -1 or images.max() > 1:
            raise ModelInputError("images: float values must be finite and in [-1, 1] (pixels p as p / 127.5 - 1)")
        return images.to(self.device).float()

    def _pixels_of(self, image: object) -> np.ndarray:
        """A PIL image as `shards build` converts it, H x W x C uint8."""
        if not isinstance(image, Image.Image):
            raise ModelInputError(f"images: a sequence of PIL images, not of {type(image).__name__}")
        converted = to_mode(image.copy(), "L" if self.image.channels == 1 else "RGB")  # never the caller's
        return np.asarray(converted).reshape(converted.height, converted.width, -1)


def _array_to_pixels(array: np.ndarray) -> torch.Tensor:
    """A uint8 array as images are held (H x W, H x W x C, N x H x W x C) to uint8 N x C x H x W."""
    if array.dtype != np.uint8:
        raise ModelInputError(f"an array of {array.dtype}: give uint8 pixels (or a float tensor in [-1, 1])")
    if array.ndim == 2:
        array = array[None, :, :, None]
    elif array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ModelInputError(f"an array of shape {array.shape}: give H x W, H x W x C or N x H x W x C pixels")
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
