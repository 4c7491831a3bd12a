"""The paper's encoder, decoder and discriminator (Larsen et al. 2016, and the authors' code).

At 64x64: 5x5 convolutions, 'same' padding, batch norm (eps 1e-6, PyTorch momentum 0.1 = the
authors' running-average factor 0.9) after every convolution but the discriminator's first, and no
bias where batch norm follows. 32x32 and 128x128 remove or add one stride-2 stage; every size ends
its convolutions at 8x8.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

BN_EPS = 1e-6
BN_MOMENTUM = 0.1
BOTTOM = 8  # spatial side where the convolutions end
ENCODER_STAGES = {32: (128, 256), 64: (64, 128, 256), 128: (32, 64, 128, 256)}
DECODER_STAGES = {32: (256, 32), 64: (256, 128, 32), 128: (256, 128, 64, 32)}
DISCRIMINATOR_STAGES = {32: (128, 256), 64: (128, 256, 256), 128: (64, 128, 256, 256)}
SIZES = tuple(sorted(ENCODER_STAGES))


def _conv(channels_in: int, channels_out: int, stride: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 5, stride=stride, padding=2, bias=bias)


class Float32Statistics:
    """Batch norm normalises in float32 when the network runs in bfloat16 or float16. DeepSpeed casts the
    parameters to bf16 and leaves the running statistics in float32: CUDA's kernel takes that mix, the
    CPU's refuses it ("expected scalar type BFloat16 but found Float"). Computing the statistics of a batch
    in float32 is what mixed precision does with them anyway; the output goes back to the input's dtype."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype in (torch.float32, torch.float64) or self.weight is None:
            return super().forward(images)
        in_float32 = {"weight": self.weight.float(), "bias": self.bias.float()}
        return torch.func.functional_call(self, in_float32, (images.float(),)).to(images.dtype)


class BatchNorm2d(Float32Statistics, nn.BatchNorm2d):
    pass


class BatchNorm1d(Float32Statistics, nn.BatchNorm1d):
    pass


def _norm2d(channels: int) -> nn.BatchNorm2d:
    return BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _norm1d(features: int) -> nn.BatchNorm1d:
    return BatchNorm1d(features, eps=BN_EPS, momentum=BN_MOMENTUM)


def _down_stages(channels_in: int, widths: tuple[int, ...]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [_conv(channels_in, width, stride=2), _norm2d(width), nn.ReLU(inplace=True)]
        channels_in = width
    return layers


class Encoder(nn.Module):
    """x -> (mu, log-variance) of q(z|x)."""

    def __init__(self, size: int, channels: int, latent_size: int = 128, fc_size: int = 2048) -> None:
        super().__init__()
        widths = ENCODER_STAGES[size]
        self.features = nn.Sequential(*_down_stages(channels, widths), nn.Flatten())
        self.fc = nn.Sequential(
            nn.Linear(widths[-1] * BOTTOM * BOTTOM, fc_size, bias=False), _norm1d(fc_size), nn.ReLU(inplace=True)
        )
        self.mu = nn.Linear(fc_size, latent_size)
        self.log_variance = nn.Linear(fc_size, latent_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.fc(self.features(images))
        return self.mu(hidden), self.log_variance(hidden)


class Decoder(nn.Module):
    """z -> image in [-1, 1]."""

    def __init__(self, size: int, channels: int, latent_size: int = 128) -> None:
        super().__init__()
        widths = DECODER_STAGES[size]
        self.first_width = widths[0]
        self.fc = nn.Sequential(
            nn.Linear(latent_size, widths[0] * BOTTOM * BOTTOM, bias=False),
            _norm1d(widths[0] * BOTTOM * BOTTOM),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        channels_in = widths[0]
        for width in widths:
            layers += [
                nn.ConvTranspose2d(channels_in, width, 5, stride=2, padding=2, output_padding=1, bias=False),
                _norm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels_in = width
        layers += [_conv(channels_in, channels, stride=1, bias=True), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.fc(z).view(-1, self.first_width, BOTTOM, BOTTOM))


class MinibatchDiscrimination(nn.Module):
    """Salimans et al. (2016), section 3.2: f(x_i) in R^A times the learned tensor T in R^(A x B x C) gives
    M_i in R^(B x C); c_b(x_i, x_j) = exp(-||M_i,b - M_j,b||_L1); o(x_i)_b = sum over j of c_b(x_i, x_j),
    j over the rows of x_i's own group (the sum includes j = i, a constant 1, as the paper writes it;
    the authors' Theano code leaves it out). Returns [f(x_i), o(x_i)], A + B features."""

    def __init__(self, in_features: int, kernels: int, kernel_dims: int) -> None:
        super().__init__()
        self.kernels, self.kernel_dims = kernels, kernel_dims
        # the paper's T, flattened to A x (B C); N(0, 0.05) as the authors' Theano layer initialises it
        # (that layer also rescales T and adds a bias: not in the paper's equation, not here)
        self.projection = nn.Parameter(torch.randn(in_features, kernels * kernel_dims) * 0.05)

    def forward(self, hidden: torch.Tensor, groups: list[int]) -> torch.Tensor:
        matrices = (hidden @ self.projection).view(-1, self.kernels, self.kernel_dims)
        closeness = []
        for group in matrices.split(groups):
            distances = (group.unsqueeze(1) - group.unsqueeze(0)).abs().sum(3)  # i x j x B
            closeness.append(torch.exp(-distances).sum(1))
        return torch.cat([hidden, torch.cat(closeness)], dim=1)


class DiscriminatorOutput(NamedTuple):
    logit: torch.Tensor  # of 'real', one per image
    features: torch.Tensor  # Dis_l: the last convolution's output before its batch norm
    hidden: torch.Tensor  # the last hidden layer (FC, batch norm, ReLU), before minibatch features


class Discriminator(nn.Module):
    """x -> (logit of 'real', Dis_l features: the last convolution's output before its batch norm).
    With `minibatch_kernels`, minibatch discrimination before the last layer (MinibatchDiscrimination)."""

    def __init__(
        self,
        size: int,
        channels: int,
        fc_size: int = 512,
        minibatch_kernels: int | None = None,
        minibatch_kernel_dims: int = 5,
    ) -> None:
        super().__init__()
        widths = DISCRIMINATOR_STAGES[size]
        self.first = nn.Sequential(_conv(channels, 32, stride=1, bias=True), nn.ReLU(inplace=True))
        layers = _down_stages(32, widths)
        self.to_features = nn.Sequential(*layers[:-2])  # up to and including the last convolution
        self.after_features = nn.Sequential(*layers[-2:], nn.Flatten())
        extra = minibatch_kernels or 0
        self.head = nn.Sequential(
            nn.Linear(widths[-1] * BOTTOM * BOTTOM, fc_size, bias=False),
            _norm1d(fc_size),
            nn.ReLU(inplace=True),
            nn.Linear(fc_size + extra, 1),
        )
        self.minibatch = None
        if minibatch_kernels:
            self.minibatch = MinibatchDiscrimination(fc_size, minibatch_kernels, minibatch_kernel_dims)

    def forward(self, images: torch.Tensor, groups: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logit, features, _ = self.classify(images, groups)
        return logit, features

    def classify(self, images: torch.Tensor, groups: list[int] | None = None) -> DiscriminatorOutput:
        """`groups`: the sizes of the consecutive groups of rows that minibatch discrimination compares
        within (default: all rows one group)."""
        features = self.features(images)
        hidden = self.head[:-1](self.after_features(features))
        last_input = hidden if self.minibatch is None else self.minibatch(hidden, groups or [len(images)])
        return DiscriminatorOutput(self.head[-1](last_input).squeeze(1), features, hidden)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Dis_l alone: the layers up to L_llike's features (the authors' `discriminator_recon`)."""
        return self.to_features(self.first(images))


@contextlib.contextmanager
def running_statistics_frozen(module: nn.Module) -> Iterator[None]:
    """Passes in train mode (batch statistics) that leave the batch norm running statistics and counters
    as they were: the authors' shared-weight copies of a network (`decoder_neggrad`,
    `discriminator_recon` in model/aegan.py) carry running statistics of their own, which nothing uses."""
    norms = [layer for layer in module.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)]
    tracking = [layer.track_running_stats for layer in norms]
    for layer in norms:
        layer.track_running_stats = False  # batch statistics, and no update (torch's BatchNorm forward)
    try:
        yield
    finally:
        for layer, tracked in zip(norms, tracking, strict=True):
            layer.track_running_stats = tracked


def check_size(size: int) -> None:
    if size not in ENCODER_STAGES:
        raise ValueError(f"image size {size} is not supported; the paper's networks take {SIZES}")


def gaussian_kl(mu: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per example, summed over latent dimensions."""
    return 0.5 * (mu.pow(2) + log_variance.exp() - 1 - log_variance).sum(dim=1)


def reparameterise(mu: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    return mu + torch.randn_like(mu) * (0.5 * log_variance).exp()


def parameter_count(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
