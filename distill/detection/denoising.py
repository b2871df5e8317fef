"""Contrastive denoising queries (DN-DETR / DINO, as in RT-DETR) for training.

Every ground-truth box is repeated in `groups` groups, each with a positive copy (small box noise, to be
reconstructed) and a negative copy (larger noise, to be classified as background); labels are flipped to a
random class with probability label_noise_ratio / 2. Groups are padded to the largest box count of the batch.
The attention mask keeps the matching queries from seeing any denoising query and each group from seeing
the others (True = blocked, as `nn.MultiheadAttention` reads a boolean mask).

A batch with no boxes at all still gets one group of two padding queries (no positives): every process then
runs the same branch and uses the same parameters, which distributed training needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill.detection.box_ops import cxcywh_to_xyxy, inverse_sigmoid, xyxy_to_cxcywh


@dataclass
class DenoisingQueries:
    content: torch.Tensor  # (B, N, C) label embeddings
    boxes_logit: torch.Tensor  # (B, N, 4) noised boxes in inverse-sigmoid space
    attn_mask: torch.Tensor  # (N + num_queries, N + num_queries), True = blocked
    positive_idx: list[torch.Tensor]  # per image: the positive queries, group by group, in target order
    groups: int
    num_denoising: int  # N


def build_denoising_queries(
    targets: list[dict],
    class_embed: nn.Embedding,
    num_classes: int,
    num_queries: int,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> DenoisingQueries:
    device = class_embed.weight.device
    counts = [len(t["labels"]) for t in targets]
    batch = len(targets)
    slots = max(max(counts, default=0), 1)  # ≥ 1: a batch without boxes still gets a (padding) group
    groups = max(num_denoising // slots, 1) if max(counts, default=0) > 0 else 1

    labels = torch.full((batch, slots), num_classes, dtype=torch.long, device=device)  # padding class
    boxes = torch.zeros(batch, slots, 4, device=device)
    real = torch.zeros(batch, slots, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = counts[i]
        labels[i, :n] = t["labels"].to(device)
        boxes[i, :n] = t["boxes"].to(device=device, dtype=boxes.dtype)
        real[i, :n] = True

    # layout per image: [group 0: positives (slots), negatives (slots)], [group 1: ...], ...
    labels = labels.repeat(1, 2 * groups)
    boxes = boxes.repeat(1, 2 * groups, 1)
    real = real.repeat(1, 2 * groups)
    negative = torch.zeros(batch, 2 * slots, 1, device=device)
    negative[:, slots:] = 1
    negative = negative.repeat(1, groups, 1)
    # where each image's positives sit, from the box counts on the host (no device sync): group g holds its
    # positives at g * 2 * slots + [0, n)
    starts = torch.arange(groups) * 2 * slots
    positive_idx = [(starts[:, None] + torch.arange(n)[None, :]).flatten() for n in counts]
    total = 2 * slots * groups

    if label_noise_ratio > 0:
        flip = (torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5) & real
        labels = torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)

    if box_noise_scale > 0:
        # corners move by up to half the box size (positives) or between one and two halves (negatives)
        half = boxes[..., 2:].repeat(1, 1, 2) * 0.5 * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes) + negative
        corners = (cxcywh_to_xyxy(boxes) + sign * magnitude * half).clamp(0.0, 1.0)
        boxes = xyxy_to_cxcywh(corners).abs()
    boxes_logit = inverse_sigmoid(boxes)

    size = total + num_queries
    attn_mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    attn_mask[total:, :total] = True  # matching queries must not see the answers
    group_of = torch.arange(total, device=device) // (2 * slots)
    attn_mask[:total, :total] = group_of[:, None] != group_of[None, :]
    return DenoisingQueries(class_embed(labels), boxes_logit, attn_mask, positive_idx, groups, total)
