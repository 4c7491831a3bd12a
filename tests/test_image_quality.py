"""PSNR, SSIM and MS-SSIM as pipeline evaluate computes them: torchmetrics called with our settings gives
that library's documented values on its documented pairs of images, and PSNR is its textbook formula."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluation.image_quality import MS_SSIM_MIN_SIDE, image_quality, ms_ssim, psnr, ssim


def documented_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """torchmetrics' SSIM and MS-SSIM docstring examples: preds = rand(3, 3, 256, 256) seeded 42,
    target = preds * 0.75, data range 1."""
    preds = torch.rand([3, 3, 256, 256], generator=torch.manual_seed(42))
    return preds, preds * 0.75


def test_psnr_is_torchmetrics_documented_value_and_the_textbook_formula() -> None:
    # torchmetrics' PeakSignalNoiseRatio docstring: these two, range 3 (max - min of the target) -> 2.5527
    preds, target = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]]), torch.tensor([[[[3.0, 2.0], [1.0, 0.0]]]])
    assert float(psnr(preds, target, data_range=3.0)) == pytest.approx(2.5527, abs=1e-4)
    images = torch.rand(4, 3, 8, 8, generator=torch.manual_seed(1)) * 2 - 1
    reconstructions = (images + 0.1 * torch.randn(4, 3, 8, 8, generator=torch.manual_seed(2))).clamp(-1, 1)
    measured = psnr(reconstructions, images, data_range=2.0)
    for got, image, reconstruction in zip(measured, images, reconstructions, strict=True):
        mse = float((image.double() - reconstruction.double()).pow(2).mean())
        assert float(got) == pytest.approx(10 * math.log10(2.0**2 / mse), rel=1e-5)  # per image, range 2


def test_ssim_and_ms_ssim_are_torchmetrics_documented_values() -> None:
    preds, target = documented_pair()
    assert float(ssim(preds, target, data_range=1.0).mean()) == pytest.approx(0.9219, abs=1e-4)
    # documented as 0.9627 (torchmetrics 1.0); 1.9 computes 0.96275-0.96285 depending on rounding
    assert float(ms_ssim(preds, target, data_range=1.0).mean()) == pytest.approx(0.9627, abs=2e-4)


def test_image_quality_is_per_image_and_ms_ssim_needs_five_scales() -> None:
    small = torch.rand(5, 1, 32, 32, generator=torch.manual_seed(3)) * 2 - 1
    quality = image_quality(small * 0.9, small)
    assert quality["psnr"].shape == quality["ssim"].shape == (5,)
    assert quality["ms_ssim"] is None  # 32 px: the window does not fit the fifth scale
    below = torch.rand(1, 1, MS_SSIM_MIN_SIDE - 1, MS_SSIM_MIN_SIDE - 1, generator=torch.manual_seed(5))
    assert image_quality(below * 0.5, below)["ms_ssim"] is None  # one pixel short: torchmetrics would refuse
    identical = image_quality(small, small)
    assert torch.isinf(identical["psnr"]).all() and torch.allclose(identical["ssim"], torch.ones(5))
    side = MS_SSIM_MIN_SIDE
    large = torch.rand(2, 3, side, side, generator=torch.manual_seed(4)) * 2 - 1
    quality = image_quality(large * 0.75, large)
    assert quality["ms_ssim"].shape == (2,) and (quality["ms_ssim"] < 1).all()
    # images in [-1, 1] are measured as the same images in [0, 1], range 1: what other tools measure on
    # (PSNR is the same either way; SSIM's luminance term is not)
    unit_reconstructions, unit_images = (large * 0.75 + 1) / 2, (large + 1) / 2
    torch.testing.assert_close(quality["ssim"], ssim(unit_reconstructions, unit_images, data_range=1.0))
    torch.testing.assert_close(quality["psnr"], psnr(large * 0.75, large, data_range=2.0))
