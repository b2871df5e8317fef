"""The frozen teacher: it takes the very view the student takes (pixels in [0, 1], after mixup) and applies
its own resolution and normalisation to it, in eval mode, without gradients."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.models.factory import InputSpec, create_model, input_spec, num_outputs


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`images` in [0, 1], (B, 3, H, W); `mean`/`std` shaped (1, 3, 1, 1) on the same device."""
    return (images - mean) / std


class InputAdapter(nn.Module):
    """Resize (only when the side differs) and normalise a [0, 1] batch for one model, on its device."""

    def __init__(self, spec: InputSpec, img_size: Optional[int] = None):
        super().__init__()
        self.img_size = img_size
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.img_size and images.shape[-1] != self.img_size:
            images = F.interpolate(images, size=(self.img_size, self.img_size), mode="bilinear", antialias=True)
        return normalize(images, self.mean, self.std)


class FrozenTeacher(nn.Module):
    def __init__(self, model: nn.Module, spec: InputSpec, img_size: Optional[int]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.prepare = InputAdapter(spec, img_size)
        self.num_classes = num_outputs(model)

    def train(self, mode: bool = True):
        return super().train(False)  # a teacher never leaves eval mode (batch norm, dropout)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.prepare(images))


def create_teacher(
    name: str,
    pretrained: bool,
    checkpoint: Optional[str],
    num_classes: int,
    img_size: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> FrozenTeacher:
    """A timm / torchvision classifier by name, with hub weights or a local checkpoint.

    With hub weights the head keeps its own class count (a mismatch with the student is caught by the
    caller); a local checkpoint is built with `num_classes` and loaded strictly.
    """
    model = create_model(
        name, num_classes=None if pretrained and not checkpoint else num_classes,
        pretrained=pretrained and not checkpoint, checkpoint=checkpoint,
    )
    spec = input_spec(model)
    if mean is not None or std is not None:
        spec = InputSpec(tuple(mean or spec.mean), tuple(std or spec.std), spec.img_size)
    return FrozenTeacher(model, spec, img_size or (spec.img_size if pretrained else None))
