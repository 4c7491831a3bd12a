"""PSNR, SSIM and MS-SSIM of each reconstruction against its image, computed by torchmetrics.

Settings, once: images in [-1, 1] are mapped to [0, 1] first, data range 1 (PSNR does not depend on that,
but SSIM's luminance term compares means, and [0, 1] or [0, 255] is what other tools measure on); SSIM
with torchmetrics' defaults, the
standard ones of Wang et al. (2004): an 11 x 11 Gaussian window of sigma 1.5, k1 0.01, k2 0.03, averaged
over channels; MS-SSIM with the same window over five scales and Wang et al.'s weights. Five scales
halve the image four times, and the window must fit the smallest (torchmetrics checks side // 16 > 10):
MS-SSIM needs a side of 11 x 2^4 = 176 pixels (256 px images have it; 32, 64 and 128 do not), and is
None below that.
Each figure is per image; the evaluation reports their mean over the held-out images.
"""

from __future__ import annotations

import torch

DATA_RANGE = 1.0  # images mapped to [0, 1]
MS_SSIM_SCALES = 5
WINDOW = 11
MS_SSIM_MIN_SIDE = WINDOW * 2 ** (MS_SSIM_SCALES - 1)  # 176


def ms_ssim_possible(height: int, width: int) -> bool:
    return min(height, width) >= MS_SSIM_MIN_SIDE


def psnr(reconstructions: torch.Tensor, images: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Per image, in dB: 10 log10(range^2 / the image's mean squared error)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio  # here: training without eval needs none

    return peak_signal_noise_ratio(reconstructions, images, data_range=data_range, reduction="none", dim=(1, 2, 3))


def ssim(reconstructions: torch.Tensor, images: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        reconstructions, images, data_range=data_range, kernel_size=WINDOW, reduction="none"
    )


def ms_ssim(reconstructions: torch.Tensor, images: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    return multiscale_structural_similarity_index_measure(
        reconstructions, images, data_range=data_range, kernel_size=WINDOW, reduction="none"
    )


def image_quality(reconstructions: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Per image (N values each, N x C x H x W inputs in [-1, 1]): "psnr" in dB, "ssim", and "ms_ssim"
    (None where the images are too small for five scales), measured on the images mapped to [0, 1]."""
    reconstructions, images = (reconstructions.float() + 1) / 2, (images.float() + 1) / 2
    five_scales = ms_ssim_possible(*images.shape[-2:])
    return {
        "psnr": psnr(reconstructions, images),
        "ssim": ssim(reconstructions, images),
        "ms_ssim": ms_ssim(reconstructions, images) if five_scales else None,
    }
