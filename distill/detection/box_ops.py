"""Box helpers. Conversions and pairwise IoU / GIoU come from torchvision.ops; only what it lacks is here, and
the GIoU loss, whose torchvision version indexes with a boolean mask (the host would wait for the GPU).

Boxes are (cx, cy, w, h) normalised to 0..1 inside the model and the losses, (x1, y1, x2, y2) for IoU.
"""
from __future__ import annotations

import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou

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


def generalized_box_iou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, reduction: str = "none",
                             eps: float = 1e-7) -> torch.Tensor:
    """1 - GIoU of boxes1[i] with boxes2[i] (xyxy): torchvision's loss, its values and gradients, computed
    with `torch.where` where torchvision indexes with a mask."""
    x1, y1, x2, y2 = boxes1.unbind(-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(-1)
    width, height = torch.min(x2, x2g) - torch.max(x1, x1g), torch.min(y2, y2g) - torch.max(y1, y1g)
    inter = torch.where((width > 0) & (height > 0), width * height, torch.zeros_like(width))
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    enclosing = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    loss = 1 - (inter / (union + eps) - (enclosing - union) / (enclosing + eps))
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum() * 0.0
    if reduction != "none":
        raise ValueError(f"reduction={reduction!r} is not one of none, mean, sum")
    return loss
