"""Box helpers. Conversions and pairwise IoU / GIoU come from torchvision.ops; only what it lacks is here.

Boxes are (cx, cy, w, h) normalised to 0..1 inside the model and the losses, (x1, y1, x2, y2) for IoU.
"""
from __future__ import annotations

import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou, generalized_box_iou_loss

__all__ = [
    "box_iou", "generalized_box_iou", "generalized_box_iou_loss", "cxcywh_to_xyxy", "xyxy_to_cxcywh",
    "elementwise_box_iou", "inverse_sigmoid",
]


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def elementwise_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of boxes1[i] with boxes2[i] (xyxy); torchvision only has the all-pairs matrix."""
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0).prod(-1)
    return inter / (area1 + area2 - inter + eps)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x), clamped so that 0 and 1 map to finite values."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
