"""Batch mixup on the device, for the samples of sources that ask for it (the paper's D2).

"Extreme" mixup as in function matching: every mixed sample draws its own weight uniformly from [0, 1].
Teacher and student both see the mixed image, so the teacher's output on it is the target; a hard-label
term mixes labels with the returned partner and weight.
"""
from __future__ import annotations

from typing import Optional

import torch


def mixup_batch(
    images: torch.Tensor, mask: torch.Tensor, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix each masked sample with another masked sample of the batch.

    images: float (B, C, H, W); mask: bool (B,), True where the sample takes mixup.
    Returns (mixed images, partner (B,) long, lam (B,)) with mixed[i] = lam[i] * x[i] + (1 - lam[i]) * x[partner[i]].
    Partners follow one random cycle through the masked samples, so none is its own partner (unless it is the
    only one). Unmasked samples keep partner = self, lam = 1 and their exact pixels.
    """
    if images.ndim != 4 or mask.shape != images.shape[:1]:
        raise ValueError(f"mixup_batch needs images (B,C,H,W) and mask (B,); "
                         f"got {tuple(images.shape)} and {tuple(mask.shape)}")
    device, batch = images.device, images.shape[0]
    draw_on = generator.device if generator is not None else device
    mask = mask.to(device=device, dtype=torch.bool)

    partner = torch.arange(batch, device=device)
    # Random order of all samples, masked ones first; each masked sample is partnered with the next in line.
    keys = torch.rand(batch, generator=generator, device=draw_on).to(device) - mask.float()
    order = keys.argsort()
    n = mask.sum()
    pos = torch.arange(batch, device=device)
    successor = torch.where(pos < n, (pos + 1) % n.clamp(min=1), pos)
    partner[order] = order[successor]

    lam = torch.rand(batch, generator=generator, device=draw_on).to(device=device, dtype=images.dtype)
    lam = torch.where(mask, lam, torch.ones_like(lam))
    weight = lam.view(-1, 1, 1, 1)
    mixed = torch.where(mask.view(-1, 1, 1, 1), weight * images + (1 - weight) * images[partner], images)
    return mixed, partner, lam
