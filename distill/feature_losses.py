"""Feature-map distillation losses: the student's projected maps against the teacher's, location by location.

Both maps are brought to one grid (bilinear; antialiased when shrinking), then compared per location over
channels and averaged over locations, images and levels. The teacher's map is standardised per location over
channels first (a layer norm without affine): a ViT's tokens carry a few channels far larger than the rest,
which would otherwise decide the loss, and its scale differs from layer to layer. The student's projection is
not normalised: its head learns to meet the standardised target.

- cosine:    1 - cos(student, teacher) per location (blind to the student's scale)
- smooth_l1: Huber with beta 1 (PyTorch's default; the references give no value), per channel
- mse:       squared error per channel
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

EPS = 1e-6


def standardise(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> zero mean, unit variance over C at every location."""
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + EPS)


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear to `size`; unchanged when already there. Shrinking is antialiased so that a fine map's every
    location contributes, not only those nearest the coarse grid's sampling points."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(student, teacher, dim=1, eps=EPS)).mean()


def smooth_l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(student, teacher, beta=1.0)


def mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student, teacher)


FEATURE_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cosine": cosine_distance,
    "smooth_l1": smooth_l1,
    "mse": mse,
}


def feature_loss(
    projected: Sequence[torch.Tensor],
    teacher_maps: Sequence[torch.Tensor],
    pairs: Sequence[int],
    kind: str = "cosine",
    grid: Optional[int] = None,
) -> torch.Tensor:
    """Mean over student levels of the `kind` loss between `projected[i]` (B, C_t, h_i, w_i) and
    `teacher_maps[pairs[i]]` (B, C_t, H, W), compared on a `grid` x `grid` grid, or on the teacher map's own."""
    compare = FEATURE_LOSSES[kind]
    losses = []
    for student, j in zip(projected, pairs):
        teacher = teacher_maps[j].float()
        size = (grid, grid) if grid else tuple(teacher.shape[-2:])
        target = standardise(resize_to(teacher, size))
        losses.append(compare(resize_to(student.float(), size), target))
    return torch.stack(losses).mean()
