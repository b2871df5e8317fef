"""From decoder outputs to detections: sigmoid scores, the top K over (query × class) pairs, boxes in
absolute xyxy pixels of the original image. No NMS: the one-to-one matching makes duplicates rare.
"""
from __future__ import annotations

import torch
from torch import nn

from distill.detection.box_ops import cxcywh_to_xyxy


class PostProcessor(nn.Module):
    def __init__(self, num_top: int = 300):
        super().__init__()
        self.num_top = num_top

    def detections(self, logits: torch.Tensor, boxes: torch.Tensor, orig_sizes: torch.Tensor):
        """Tensors only (for export): scores (B, K), labels (B, K), boxes (B, K, 4) xyxy in pixels."""
        logits, boxes = logits.float(), boxes.float()  # scores and pixels in full precision under autocast
        num_classes = logits.shape[-1]
        k = min(self.num_top, logits.shape[1] * num_classes)
        scores, flat_index = logits.sigmoid().flatten(1).topk(k, dim=1)
        labels = flat_index % num_classes
        query = flat_index // num_classes
        scale = orig_sizes.to(boxes.dtype).repeat(1, 2)[:, None, :]  # (w, h, w, h)
        xyxy = cxcywh_to_xyxy(boxes) * scale
        return scores, labels, xyxy.gather(1, query[..., None].expand(-1, -1, 4))

    def forward(self, outputs: dict, orig_sizes: torch.Tensor) -> list[dict]:
        """orig_sizes (B, 2) as (width, height) → per image {"scores", "labels", "boxes"}."""
        scores, labels, boxes = self.detections(outputs["pred_logits"], outputs["pred_boxes"], orig_sizes)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
