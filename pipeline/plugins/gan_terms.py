"""The VAE-GAN's GAN terms, per image or per batch, with the options of Salimans et al., "Improved
Techniques for Training GANs" (2016) that change them: one-sided label smoothing (3.4) and feature
matching (3.1). Dis = sigmoid(logit); eps (the authors' 1e-3) inside every log."""

from __future__ import annotations

import torch


def discriminator_cost(logit: torch.Tensor, target: float, eps: float) -> torch.Tensor:
    """Per image, the cross-entropy of Dis against `target` (1 real, 0 generated, alpha smoothed):
    -[t log(Dis + eps) + (1 - t) log(1 - Dis + eps)]."""
    probability = torch.sigmoid(logit)
    if target == 1:
        return -torch.log(probability + eps)
    if target == 0:
        return -torch.log(1 - probability + eps)
    return -(target * torch.log(probability + eps) + (1 - target) * torch.log(1 - probability + eps))


def feature_matching(real_hidden: torch.Tensor, generated_hidden: torch.Tensor) -> torch.Tensor:
    """||mean f(x) - mean f(Dec(z))||^2 (section 3.1) over the discriminator's last hidden layer f; the
    real images' mean is a constant target, as L_llike's (under joint batches it depends on the generated
    images through the statistics, and that path is not the paper's)."""
    wide = torch.promote_types(generated_hidden.dtype, torch.float32)  # bf16 activations: the sum in float32
    return (real_hidden.detach().to(wide).mean(0) - generated_hidden.to(wide).mean(0)).pow(2).sum()


def generated_term(
    generator_loss: str, fake_logit: torch.Tensor, real_hidden: torch.Tensor, fake_hidden: torch.Tensor, eps: float
) -> torch.Tensor:
    """The decoder's GAN term over the generated images: saturating (the authors') mean log(1 - Dis(.)),
    non-saturating mean -log Dis(.), or feature matching."""
    if generator_loss == "saturating":
        return -discriminator_cost(fake_logit, 0.0, eps).mean()
    if generator_loss == "non_saturating":
        return discriminator_cost(fake_logit, 1.0, eps).mean()
    return feature_matching(real_hidden, fake_hidden)


def real_rows_term(
    generator_loss: str, real_logit: torch.Tensor, real_target: float, eps: float
) -> torch.Tensor | None:
    """Under joint batches, the real images' part of the decoder's GAN term (vaegan.py's docstring): the
    reversed discriminator's loss on them (saturating: minus their cost against their target, smoothed or
    1), or that loss with the label swapped (non-saturating: their cost against 1 - target). None for
    feature matching, whose real mean is a constant target."""
    if generator_loss == "saturating":
        return -discriminator_cost(real_logit, real_target, eps).mean()
    if generator_loss == "non_saturating":
        return discriminator_cost(real_logit, 1 - real_target, eps).mean()
    return None
