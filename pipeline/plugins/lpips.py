"""LPIPS (Zhang et al. 2018, "The unreasonable effectiveness of deep features as a perceptual metric"), the
VGG16 variant v0.1 that latent diffusion's loss uses, in plain torch (no torchvision): the input scaled
by the package's constants, VGG16's features at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, each unit-
normalised over its channels, their squared difference weighted per channel by a 1x1 convolution,
averaged over the positions and summed over the five layers. One value per image pair, N x 1 x 1 x 1.

Frozen and never trained here: its weights come from a file the user gives (`model.lpips_weights`, made by
`pipeline lpips-weights` from the `lpips` package's linear layers and torchvision's VGG16), with the
`lpips` package's key names: `net.slice{1..5}.{N}.*` (N: torchvision's index in vgg16().features) and
`lin{0..4}.model.1.weight`. Evaluated in eval mode, as the `lpips` package's metric is (no dropout).
"""

from __future__ import annotations

import torch
from torch import nn

# lpips/pretrained_networks.py: where each slice of torchvision's vgg16().features ends (after each relu)
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
CHANNELS = (64, 128, 256, 512, 512)
# lpips/lpips.py ScalingLayer: inputs in [-1, 1] shifted and scaled toward ImageNet's statistics
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor


def vgg16_features() -> list[nn.Module]:
    """torchvision's vgg16().features, index for index."""
    layers: list[nn.Module] = []
    channels = 3
    for width in VGG16_LAYERS:
        if width == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
    return layers


class VGG16Slices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        features = vgg16_features()
        for number, (start, end) in enumerate(SLICES, start=1):
            part = nn.Sequential()
            for index in range(start, end):
                part.add_module(str(index), features[index])
            setattr(self, f"slice{number}", part)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for number in range(1, len(SLICES) + 1):
            x = getattr(self, f"slice{number}")(x)
            outputs.append(x)
        return outputs


class LinearLayer(nn.Module):
    """NetLinLayer: a 1x1 convolution to one channel, without bias (model.0 is the package's dropout)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None], persistent=False)
        self.net = VGG16Slices()
        for index, channels in enumerate(CHANNELS):
            setattr(self, f"lin{index}", LinearLayer(channels))
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """images and targets: N x 3 x H x W in [-1, 1]; a grayscale image is compared as its RGB."""
        if images.shape[1] == 1:
            images, targets = images.expand(-1, 3, -1, -1), targets.expand(-1, 3, -1, -1)
        first = self.net((images - self.shift.to(images.dtype)) / self.scale.to(images.dtype))
        second = self.net((targets - self.shift.to(images.dtype)) / self.scale.to(images.dtype))
        distance = 0
        for index, (a, b) in enumerate(zip(first, second, strict=True)):
            difference = (unit(a) - unit(b)) ** 2
            distance = distance + getattr(self, f"lin{index}").model(difference).mean((2, 3), keepdim=True)
        return distance


def unit(features: torch.Tensor) -> torch.Tensor:
    return features / (features.pow(2).sum(1, keepdim=True).sqrt() + NORM_EPS)


def from_sources(lpips_state: dict[str, torch.Tensor], vgg16_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights file's tensors from the `lpips` package's linear layers (its weights/v0.1/vgg.pth:
    lin0.model.1.weight ...) and torchvision's vgg16 state dict (features.N.weight, features.N.bias)."""
    tensors = {key: value for key, value in lpips_state.items() if key.startswith("lin")}
    for key, value in vgg16_state.items():
        if key.startswith("features."):
            index = int(key.split(".")[1])
            number = next(n for n, (start, end) in enumerate(SLICES, start=1) if start <= index < end)
            tensors[f"net.slice{number}.{key.removeprefix('features.')}"] = value
    return {key: value.detach().float().contiguous() for key, value in tensors.items()}
