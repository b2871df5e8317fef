"""The frozen teacher: it takes the very view the student takes (pixels in [0, 1], after mixup) and applies
its own resolution, resizing and normalisation to it, in eval mode, without gradients.

The teacher's side is a choice with a price: a pretrained teacher runs at its own input size by default, so a
view smaller than that is upsampled (no new pixels, but objects appear at the scale the teacher was trained
on) and the teacher's cost grows with the square of the side. `teacher_flops` counts it without weights.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.models.factory import InputSpec, create_model, input_spec, num_outputs


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`images` in [0, 1], (B, 3, H, W); `mean`/`std` shaped (1, 3, 1, 1) on the same device."""
    return (images - mean) / std


INTERPOLATIONS = ("bilinear", "bicubic")


class InputAdapter(nn.Module):
    """Resize (only when the side differs) and normalise a [0, 1] batch for one model, on its device.

    `interpolation` defaults to the one the model's training data were resized with (timm's pretrained
    config; bicubic for the EfficientNets). Bicubic overshoots at edges, so its output is clamped to [0, 1]
    as an 8-bit resize would be."""

    def __init__(self, spec: InputSpec, img_size: Optional[int] = None, interpolation: Optional[str] = None):
        super().__init__()
        self.img_size = img_size
        self.interpolation = interpolation or (spec.interpolation if spec.interpolation in INTERPOLATIONS else "bicubic")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.img_size and images.shape[-1] != self.img_size:
            images = F.interpolate(images, size=(self.img_size, self.img_size), mode=self.interpolation,
                                   antialias=True)
            if self.interpolation == "bicubic":
                images = images.clamp(0, 1)
        return normalize(images, self.mean, self.std)


class FrozenTeacher(nn.Module):
    def __init__(self, model: nn.Module, spec: InputSpec, img_size: Optional[int], interpolation: Optional[str] = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.prepare = InputAdapter(spec, img_size, interpolation)
        self.num_classes = num_outputs(model)

    def train(self, mode: bool = True):
        return super().train(False)  # a teacher never leaves eval mode (batch norm, dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            weight = next(self.model.parameters())
            x = self.prepare(images).to(weight.dtype)  # resized and normalised in float32, then the weights' type
            if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last):
                x = x.contiguous(memory_format=torch.channels_last)
            logits = self.model(x)
        return logits.clone()  # an inference-mode tensor cannot take part in the student's loss; a copy can

    def for_device(self, device, precision: str, channels_last: bool, compile: bool,
                   compile_mode: Optional[str] = None) -> "FrozenTeacher":
        """On `device`, in the run's precision (bf16 weights under bf16 mixed precision: no casts per call),
        channels-last if asked, and compiled in place for inference if asked."""
        self.to(device)
        if precision == "bf16":
            self.model.to(torch.bfloat16)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.compile(mode=compile_mode)
        return self


def create_teacher(
    name: str,
    pretrained: bool,
    checkpoint: Optional[str],
    num_classes: int,
    img_size: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    interpolation: Optional[str] = None,
    view_size: Optional[int] = None,
) -> FrozenTeacher:
    """A timm / torchvision classifier by name, with hub weights or a local checkpoint.

    With hub weights the head keeps its own class count (a mismatch with the student is caught by the
    caller); a local checkpoint is built with `num_classes` and loaded strictly. The side defaults as
    `teacher_input_size` says, the interpolation as `InputAdapter` says. A model built for one side only (a
    ViT) is built for the side it will run at: `img_size`, else its own (hub weights) or `view_size`.
    """
    hub = pretrained and not checkpoint
    model = create_model(
        name, num_classes=None if hub else num_classes, pretrained=hub, checkpoint=checkpoint,
        img_size=img_size or (None if hub else view_size),
    )
    spec = input_spec(model)
    if mean is not None or std is not None:
        spec = InputSpec(tuple(mean or spec.mean), tuple(std or spec.std), spec.img_size, spec.interpolation)
    return FrozenTeacher(model, spec, teacher_input_size(spec, pretrained, img_size), interpolation)


def teacher_input_size(spec: InputSpec, pretrained: bool, img_size: Optional[int] = None) -> Optional[int]:
    """The side the teacher runs at: `img_size` when given, else a hub-weights teacher's own pretrained side;
    None (the view's own side) for a teacher from a local checkpoint."""
    return img_size or (spec.img_size if pretrained else None)


def count_flops(name: str, img_size: int, num_classes: Optional[int] = None) -> float:
    """Forward FLOPs of one image at `img_size` (2 x the multiply-adds of convolutions and matrix products, as
    torch's FlopCounterMode counts them). The model is built on the meta device: no weights, no memory."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, img_size=img_size).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, img_size, img_size, device="meta"))
    return float(counter.get_total_flops())


def model_spec(name: str, num_classes: Optional[int] = None) -> InputSpec:
    """A model's input spec from its configuration alone (meta device, no weights read)."""
    with torch.device("meta"):
        return input_spec(create_model(name, num_classes=num_classes))
