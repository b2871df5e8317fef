"""D-FINE's training loss: RT-DETR's (varifocal, L1, GIoU) plus two terms on the corner distributions, with
D-FINE's weights: vfl 1, bbox 5, giou 2, fgl 0.15, ddf 1.5 (DEIM's: `classification="mal"`, gamma 1.5,
`loss_mal` 1 in place of `loss_vfl`).

- `loss_fgl` (fine-grained localisation): each edge's distribution is pulled towards the two bins around
  the target distance (cross-entropy, split by linear interpolation between them), weighted by the IoU of
  the predicted box; for every layer and every denoising layer.
- `loss_ddf` (decoupled distillation focal), GO-LSD: each earlier layer's distributions follow the last
  layer's (KL divergence at temperature 5, scaled by T²), weighted per query by the last layer's best
  class probability, or for matched queries by the layer's own IoU; the matched and unmatched queries are
  averaged apart and mixed by the square roots of their counts (counted as for a batch of 8 images).

Matching is global: the one-to-one matches of the last layer, the auxiliary layers, the first layer's plain
head (`_pre`) and the encoder proposals are pooled, and each query keeps the target it was matched to most
often. The box and distribution losses use that union (normalised by its size); each output's
classification loss keeps its own matches. The encoder and `_pre` outputs have no distributions: no fgl / ddf for them.
Denoising outputs use their known targets; the last denoising layer is their teacher.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from distill.detection.box_ops import cxcywh_to_xyxy, elementwise_box_iou
from distill.detection.criterion import (
    RTDETRCriterion,
    _gather,
    average_box_count,
    average_count,
    denoising_indices,
)
from distill.detection.distribution import DEFAULT_UP, box_to_distance
from distill.detection.matcher import HungarianMatcher

DFINE_WEIGHTS = {"vfl": 1.0, "mal": 1.0, "bbox": 5.0, "giou": 2.0, "fgl": 0.15, "ddf": 1.5}

Indices = list[tuple[torch.Tensor, torch.Tensor]]


def union_of_matches(index_sets: list[Indices]) -> Indices:
    """Per image, every query matched in any set, with the target it was matched to most often (ties: the
    lower target index); sorted by query."""
    union = []
    for per_image in zip(*index_sets):
        pairs = torch.cat([torch.stack([q, t], 1) for q, t in per_image]).long()
        if len(pairs) == 0:
            empty = torch.zeros(0, dtype=torch.long)
            union.append((empty, empty))
            continue
        unique, counts = torch.unique(pairs, dim=0, return_counts=True)  # sorted by (query, target)
        order = torch.argsort(-counts, stable=True)  # most frequent first, ties keep the lower target
        order = order[torch.argsort(unique[order, 0], stable=True)]  # grouped by query
        ranked = unique[order]
        first = torch.ones(len(ranked), dtype=torch.bool)
        first[1:] = ranked[1:, 0] != ranked[:-1, 0]
        union.append((ranked[first, 0], ranked[first, 1]))
    return union


class DFINECriterion(RTDETRCriterion):
    def __init__(self, num_classes: int, matcher: Optional[HungarianMatcher] = None,
                 weights: Optional[dict[str, float]] = None, alpha: float = 0.75, gamma: float = 2.0,
                 reg_max: int = 32, reg_scale: float = 4.0, up: float = DEFAULT_UP, temperature: float = 5.0,
                 classification: str = "vfl"):
        super().__init__(num_classes, matcher, {**DFINE_WEIGHTS, **(weights or {})}, alpha, gamma, classification)
        self.reg_max, self.reg_scale, self.up = reg_max, reg_scale, up
        self.temperature = temperature

    def corner_targets(self, ref_points, targets, indices):
        """Per matched edge: (left bin as a float index, right-bin weight, left-bin weight)."""
        batch_idx, query_idx, matched_boxes, _ = _gather(targets, indices, ref_points.device)
        return box_to_distance(ref_points[batch_idx, query_idx].detach().float(), cxcywh_to_xyxy(matched_boxes),
                               self.reg_max, self.reg_scale, self.up)

    def matched_iou(self, boxes, targets, indices) -> torch.Tensor:
        batch_idx, query_idx, matched_boxes, _ = _gather(targets, indices, boxes.device)
        return elementwise_box_iou(cxcywh_to_xyxy(boxes[batch_idx, query_idx].detach().float()),
                                   cxcywh_to_xyxy(matched_boxes))

    def fine_grained_localisation(self, output, targets, indices, corner_targets, num_boxes) -> torch.Tensor:
        batch_idx, query_idx, _, _ = _gather(targets, indices, output["pred_corners"].device)
        corners = output["pred_corners"][batch_idx, query_idx].float().reshape(-1, self.reg_max + 1)
        index, weight_right, weight_left = corner_targets
        left = index.long()
        loss = (F.cross_entropy(corners, left, reduction="none") * weight_left
                + F.cross_entropy(corners, left + 1, reduction="none") * weight_right)
        iou = self.matched_iou(output["pred_boxes"], targets, indices).repeat_interleave(4)
        return (loss * iou).sum() / num_boxes

    def distillation(self, output, teacher, targets, indices, balance) -> torch.Tensor:
        """KL(teacher ‖ layer) per edge; `balance` = (positive weight, negative weight)."""
        bins, t = self.reg_max + 1, self.temperature
        corners = output["pred_corners"].float().reshape(-1, bins)
        teacher_corners = teacher["pred_corners"].float().reshape(-1, bins).detach()
        with torch.no_grad():
            weight = teacher["pred_logits"].float().sigmoid().max(-1).values  # (B, Q)
            batch_idx, query_idx, _, _ = _gather(targets, indices, weight.device)
            weight[batch_idx, query_idx] = self.matched_iou(output["pred_boxes"], targets, indices)
            matched = torch.zeros_like(weight, dtype=torch.bool)
            matched[batch_idx, query_idx] = True
            weight, matched = weight.repeat_interleave(4), matched.repeat_interleave(4)
        kl = F.kl_div(F.log_softmax(corners / t, dim=1), F.softmax(teacher_corners / t, dim=1),
                      reduction="none").sum(-1)
        loss = weight * t ** 2 * kl
        # the matched and unmatched edges averaged apart (0 where there are none), without a mask's indexing or
        # a count read back: both would make the host wait for the device
        count = matched.sum()
        pos = torch.where(matched, loss, 0.0).sum() / count.clamp(min=1)
        neg = torch.where(matched, 0.0, loss).sum() / (matched.numel() - count).clamp(min=1)
        positive, negative = balance
        return (pos * positive + neg * negative) / (positive + negative)

    @staticmethod
    def distillation_balance(output: dict, indices: Indices) -> tuple[float, float]:
        """sqrt of the matched / unmatched edge counts, as if the batch held 8 images."""
        batch, queries = output["pred_boxes"].shape[:2]
        matched = 4 * sum(len(q) for q, _ in indices)
        scale = 8 / batch
        return (matched * scale) ** 0.5, ((4 * batch * queries - matched) * scale) ** 0.5

    def layer_losses(self, output, targets, own, shared, num_boxes, num_shared, suffix, teacher=None,
                     balance=None, corner_targets=None) -> dict[str, torch.Tensor]:
        """One output's weighted losses: classification on its own matches, boxes (and distributions) on `shared`."""
        l1, giou = self.box_losses(output["pred_boxes"], targets, shared, num_shared)
        losses = {**self.classify(output["pred_logits"], output["pred_boxes"], targets, own, num_boxes),
                  "bbox": l1, "giou": giou}
        if "pred_corners" in output:
            losses["fgl"] = self.fine_grained_localisation(output, targets, shared, corner_targets, num_shared)
            if teacher is output:  # the teacher itself: nothing to distil (kept at zero, as the reference logs it)
                losses["ddf"] = output["pred_corners"].sum() * 0
            elif teacher is not None:
                losses["ddf"] = self.distillation(output, teacher, targets, shared, balance)
        return {f"loss_{k}{suffix}": self.weights[k] * v for k, v in losses.items()}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Weighted losses by name (`loss_fgl`, `loss_ddf_aux_0`, `loss_vfl_pre`, `loss_giou_enc_0`,
        `loss_fgl_dn_1`, `loss_bbox_dn_pre`, ...); their sum is the total."""
        device = outputs["pred_logits"].device
        num_boxes = average_box_count(targets, device)
        named = [("", outputs), *[(f"_aux_{i}", o) for i, o in enumerate(outputs.get("aux_outputs", []))]]
        if "pre_outputs" in outputs:
            named.append(("_pre", outputs["pre_outputs"]))
        named += [(f"_enc_{i}", o) for i, o in enumerate(outputs.get("enc_outputs", []))]
        matches = self.matcher.match_all([o for _, o in named], targets)
        union = union_of_matches(matches)
        num_union = average_count(sum(len(q) for q, _ in union), device)
        corner_targets = self.corner_targets(outputs["ref_points"], targets, union)
        balance = self.distillation_balance(outputs, union)

        losses = {}
        for (suffix, output), own in zip(named, matches):
            losses.update(self.layer_losses(output, targets, own, union, num_boxes, num_union, suffix,
                                            outputs if suffix.startswith("_aux") else None, balance,
                                            corner_targets))
        if "dn_outputs" in outputs:
            dn = outputs["dn_outputs"]
            indices = denoising_indices(outputs["dn_meta"], targets)
            num_dn = num_boxes * outputs["dn_meta"]["groups"]
            dn_targets = self.corner_targets(dn[0]["ref_points"], targets, indices)
            for i, output in enumerate(dn):
                losses.update(self.layer_losses(output, targets, indices, indices, num_dn, num_dn, f"_dn_{i}",
                                                dn[-1], balance, dn_targets))
            if "dn_pre_outputs" in outputs:
                losses.update(self.layer_losses(outputs["dn_pre_outputs"], targets, indices, indices, num_dn,
                                                num_dn, "_dn_pre"))
        # as the reference: a NaN term (a degenerate box) counts as zero rather than ending the run
        return {k: torch.nan_to_num(v, nan=0.0) for k, v in losses.items()}
