"""RT-DETR's training loss: varifocal loss on IoU-aware scores (weight 1), L1 (5) and GIoU (2) on boxes,
for the last decoder layer, each auxiliary layer, the encoder's top-K proposals and the denoising groups.
`classification="mal"` puts DEIM's matchability-aware loss (`loss_mal`, weight 1, gamma 1.5) in place of
the varifocal one.

Predictions are matched to targets by the Hungarian matcher, except denoising queries, whose targets are
known by construction. Losses are normalised by the number of target boxes averaged over processes (at
least 1), so a process, or a whole batch, without any box still gives finite losses that touch every head.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distill.detection.box_ops import cxcywh_to_xyxy, elementwise_box_iou, generalized_box_iou_loss
from distill.detection.matcher import HungarianMatcher
from distill.detection.settings import CLASSIFICATION_LOSSES
from distill.engine.host_copy import to_device

DEFAULT_WEIGHTS = {"vfl": 1.0, "mal": 1.0, "bbox": 5.0, "giou": 2.0}
MAL_GAMMA = 1.5  # DEIM's


def average_box_count(targets: list[dict], device: torch.device) -> torch.Tensor:
    return average_count(sum(len(t["labels"]) for t in targets), device)


def average_count(count: int, device: torch.device) -> torch.Tensor:
    """A per-process count averaged over processes, at least 1: the normaliser of a loss."""
    count = torch.full((), float(count), device=device)  # a fill on the device, not a copy that waits for it
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


class RTDETRCriterion(nn.Module):
    def __init__(self, num_classes: int, matcher: Optional[HungarianMatcher] = None,
                 weights: Optional[dict[str, float]] = None, alpha: float = 0.75, gamma: float = 2.0,
                 classification: str = "vfl"):
        super().__init__()
        if classification not in CLASSIFICATION_LOSSES:
            raise ValueError(f"classification={classification!r} is not one of {', '.join(CLASSIFICATION_LOSSES)}")
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.alpha, self.gamma = alpha, gamma
        self.classification = classification

    def iou_targets(self, logits, boxes, targets, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(IoU of each matched prediction on its target's class, 0 elsewhere; 1 on those entries, 0 elsewhere)."""
        batch_idx, query_idx, matched_boxes, matched_labels = _gather(targets, indices, logits.device)
        target = torch.zeros_like(logits)
        if len(query_idx):
            iou = elementwise_box_iou(cxcywh_to_xyxy(boxes[batch_idx, query_idx].detach()),
                                      cxcywh_to_xyxy(matched_boxes)).to(logits.dtype)
            target[batch_idx, query_idx, matched_labels] = iou
        is_positive = torch.zeros_like(logits)
        is_positive[batch_idx, query_idx, matched_labels] = 1.0
        return target, is_positive

    def varifocal(self, logits, boxes, targets, indices, num_boxes) -> torch.Tensor:
        """BCE towards an IoU-valued target on the matched class; negatives weighted by alpha · p^gamma."""
        logits = logits.float()
        target, is_positive = self.iou_targets(logits, boxes, targets, indices)
        weight = self.alpha * logits.detach().sigmoid().pow(self.gamma) * (1 - is_positive) + target
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
        return loss.sum() / num_boxes

    def matchability(self, logits, boxes, targets, indices, num_boxes) -> torch.Tensor:
        """DEIM's MAL: BCE towards IoU^gamma on the matched class, positives at full weight (a low IoU still
        teaches), negatives weighted by p^gamma (no alpha)."""
        logits = logits.float()
        target, is_positive = self.iou_targets(logits, boxes, targets, indices)
        weight = logits.detach().sigmoid().pow(self.gamma) * (1 - is_positive) + is_positive
        loss = F.binary_cross_entropy_with_logits(logits, target.pow(self.gamma), weight=weight, reduction="none")
        return loss.sum() / num_boxes

    def classify(self, logits, boxes, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        loss = self.varifocal if self.classification == "vfl" else self.matchability
        return {self.classification: loss(logits, boxes, targets, indices, num_boxes)}

    def box_losses(self, boxes, targets, indices, num_boxes) -> tuple[torch.Tensor, torch.Tensor]:
        batch_idx, query_idx, matched_boxes, _ = _gather(targets, indices, boxes.device)
        predicted = boxes[batch_idx, query_idx].float()
        l1 = F.l1_loss(predicted, matched_boxes, reduction="none").sum() / num_boxes
        giou = generalized_box_iou_loss(cxcywh_to_xyxy(predicted), cxcywh_to_xyxy(matched_boxes), reduction="sum")
        return l1, giou / num_boxes

    def single(self, output: dict, targets, indices, num_boxes, suffix: str) -> dict[str, torch.Tensor]:
        logits, boxes = output["pred_logits"], output["pred_boxes"]
        l1, giou = self.box_losses(boxes, targets, indices, num_boxes)
        losses = {**self.classify(logits, boxes, targets, indices, num_boxes), "bbox": l1, "giou": giou}
        return {f"loss_{k}{suffix}": self.weights[k] * v for k, v in losses.items()}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Weighted losses by name (`loss_vfl`, `loss_bbox_aux_0`, `loss_giou_enc_0`, `loss_vfl_dn_2`, ...);
        their sum is the total."""
        num_boxes = average_box_count(targets, outputs["pred_logits"].device)
        losses = {}
        named = list(_matched_outputs(outputs))
        for (suffix, output), indices in zip(named, self.matcher.match_all([o for _, o in named], targets)):
            losses.update(self.single(output, targets, indices, num_boxes, suffix))
        if "dn_outputs" in outputs:
            meta = outputs["dn_meta"]
            indices = denoising_indices(meta, targets)
            for i, output in enumerate(outputs["dn_outputs"]):
                losses.update(self.single(output, targets, indices, num_boxes * meta["groups"], f"_dn_{i}"))
        return losses


def denoising_indices(meta: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (query, target) pairs of the denoising positives: laid out group by group, in target order."""
    counts = [len(t["labels"]) for t in targets]
    return [(idx, torch.arange(n).repeat(meta["groups"])) for idx, n in zip(meta["positive_idx"], counts)]


def _matched_outputs(outputs: dict):
    yield "", outputs
    for i, aux in enumerate(outputs.get("aux_outputs", [])):
        yield f"_aux_{i}", aux
    for i, enc in enumerate(outputs.get("enc_outputs", [])):
        yield f"_enc_{i}", enc


def _gather(targets, indices, device):
    """Flattened (image index, query index, target box, target label) of all matched pairs. The indices are
    host tensors: they go to the device in one copy from pinned memory, which does not wait for the device."""
    src = torch.cat([s for s, _ in indices])
    image = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)])
    offsets = torch.tensor([0] + [len(t["labels"]) for t in targets]).cumsum(0)[:-1]
    flat = torch.cat([t + offsets[i] for i, (_, t) in enumerate(indices)])
    batch_idx, query_idx, target_idx = to_device(torch.stack([image, src, flat]), device)
    boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).to(device)[target_idx]
    labels = torch.cat([t["labels"] for t in targets]).to(device)[target_idx]
    return batch_idx, query_idx, boxes.float(), labels
