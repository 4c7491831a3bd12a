"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022; Stable Diffusion's VAE), as
diffusers' `AutoencoderKL` builds it: ResNet blocks with GroupNorm and SiLU, a mid-block with single-head
self-attention, `block_out_channels` per resolution, `layers_per_block` ResNets per down block (one more
per up block), and the diagonal Gaussian posterior from `quant_conv`.

Written in plain torch (no diffusers at run time) with diffusers' module names, so that the encoder
network's state dict (`encoder.*`, `quant_conv.*`) and the decoder network's (`post_quant_conv.*`,
`decoder.*`) together are `AutoencoderKL.state_dict()` key for key and shape for shape: an export is a
rename-free save. Sources: diffusers src/diffusers/models/autoencoders/{autoencoder_kl,vae}.py,
unets/unet_2d_blocks.py (DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D), resnet.py
(ResnetBlock2D without time embedding), downsampling.py / upsampling.py, attention_processor.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUP_NORM_EPS = 1e-6  # every GroupNorm of diffusers' VAE (resnet_eps, the attention's and conv_norm_out's)
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=GROUP_NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=GROUP_NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample2D(nn.Module):
    """A stride-2 convolution without padding after padding the right and bottom by one (the VAE's)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """One head over every position, the channels as the head's width, with a residual connection."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.group_norm(x).view(batch, channels, height * width).transpose(1, 2)
        attended = F.scaled_dot_product_attention(self.to_q(h)[:, None], self.to_k(h)[:, None], self.to_v(h)[:, None])
        out = self.to_out[1](self.to_out[0](attended[:, 0]))
        return out.transpose(1, 2).reshape(batch, channels, height, width) + x


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class ResnetStack(nn.Module):
    """DownEncoderBlock2D (resampler: downsamplers) and UpDecoderBlock2D (upsamplers)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, resampler: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if index == 0 else out_channels, out_channels, groups) for index in range(layers)
        )
        if resampler == "downsamplers":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels)])
        elif resampler == "upsamplers":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for resample in (*getattr(self, "downsamplers", ()), *getattr(self, "upsamplers", ())):
            x = resample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, in_channels: int, latent: int, widths: list[int], layers: int, groups: int, attention: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        last = len(widths) - 1
        self.down_blocks = nn.ModuleList(
            ResnetStack(widths[max(index - 1, 0)], width, layers, groups, None if index == last else "downsamplers")
            for index, width in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], groups, attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * latent, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, latent: int, out_channels: int, widths: list[int], layers: int, groups: int, attention: bool):
        super().__init__()
        reversed_widths = widths[::-1]
        self.conv_in = nn.Conv2d(latent, reversed_widths[0], 3, padding=1)
        self.mid_block = MidBlock(reversed_widths[0], groups, attention)
        last = len(widths) - 1
        self.up_blocks = nn.ModuleList(
            ResnetStack(
                reversed_widths[max(index - 1, 0)], width, layers + 1, groups, None if index == last else "upsamplers"
            )
            for index, width in enumerate(reversed_widths)
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[0], eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class PosteriorEncoder(nn.Module):
    """The `encoder` network: images to the posterior's mean and (clamped) log-variance, each N x latent x
    H/f x W/f, f = 2 ** (len(block_out_channels) - 1). Holds diffusers' `encoder` and `quant_conv`."""

    def __init__(self, in_channels: int, latent: int, widths: list[int], layers: int, groups: int, attention: bool):
        super().__init__()
        self.encoder = Encoder(in_channels, latent, widths, layers, groups, attention)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_variance = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, log_variance.clamp(*LOGVAR_RANGE)


class LatentDecoder(nn.Module):
    """The `decoder` network: latents to images in [-1, 1] (unbounded, as diffusers': no tanh). Holds
    diffusers' `post_quant_conv` and `decoder`; `logvar` is the loss's output log-variance, a parameter here
    only when it is learnt (never exported)."""

    def __init__(self, latent: int, out_channels: int, widths: list[int], layers: int, groups: int, attention: bool):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)
        self.decoder = Decoder(latent, out_channels, widths, layers, groups, attention)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents))

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight compares gradients at (LDM's get_last_layer)."""
        return self.decoder.conv_out.weight


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN as taming-transformers' NLayerDiscriminator (batch norm): a logit per patch.
    Keys `main.N.*` as there; initialised as its weights_init (conv weights N(0, 0.02), batch norm scale
    N(1, 0.02) and shift 0)."""

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        sequence: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = 1
        for index in range(1, layers + 1):
            previous, width = width, min(2**index, 8)
            stride = 1 if index == layers else 2
            sequence += [
                nn.Conv2d(channels * previous, channels * width, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels * width),
                nn.LeakyReLU(0.2),
            ]
        sequence.append(nn.Conv2d(channels * width, 1, 4, padding=1))
        self.main = nn.Sequential(*sequence)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last hidden layer (before the logit convolution) and the logits."""
        hidden = self.main[:-1](images)
        return hidden, self.main[-1](hidden)
