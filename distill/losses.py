"""Distillation losses: KL between teacher and student distributions, plus an optional label term."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_divergence(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) per batch, scaled by T² so gradients keep their size across temperatures.

    `teacher_probs` is already softened at `temperature` (see `soften`); sharing one signature lets the offline
    mode pass stored probabilities where the online mode passes the teacher's live output.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_q, teacher_probs.float(), reduction="batchmean") * temperature**2


def soften(teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.softmax(teacher_logits.float() / temperature, dim=-1)


def mixed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy against the labels of a mixed batch: λ·CE(label) + (1-λ)·CE(label of the partner)."""
    ce = lambda y: F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=smoothing)  # noqa: E731
    return (lam * ce(labels) + (1 - lam) * ce(partner_labels)).mean()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor | None,
    labels: torch.Tensor,
    partner_labels: torch.Tensor,
    lam: torch.Tensor,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The weighted terms and their sum under `loss`; a zero-weight term is not computed. `partner_labels` and
    `lam` describe each sample's mixup (an unmixed sample is its own partner, with λ = 1)."""
    terms: dict[str, torch.Tensor] = {}
    if kd_weight:
        terms["kd"] = kl_divergence(student_logits, teacher_probs, temperature)
    if ce_weight:
        terms["ce"] = mixed_cross_entropy(student_logits, labels, partner_labels, lam, label_smoothing)
    terms["loss"] = kd_weight * terms.get("kd", 0.0) + ce_weight * terms.get("ce", 0.0)
    return terms


def dense_from_topk(
    indices: torch.Tensor, probs: torch.Tensor, num_classes: int, temperature: float = 1.0
) -> torch.Tensor:
    """Stored teacher probabilities (B, k) of classes `indices` as full distributions (B, num_classes).

    The mass the top k leave out is spread evenly over the other classes (as TinyViT does), not dropped: the
    student is not told those classes are impossible, only that the teacher ranks them below the k kept. With
    k = num_classes (the full distribution stored) nothing is spread. Stored probabilities are at temperature
    1; softmax(z / T) is proportional to p ** (1 / T), so another temperature is applied here, after the spread.
    """
    probs = probs.float()
    k = indices.shape[1]
    rest = (1.0 - probs.sum(dim=1, keepdim=True)).clamp_min(0.0) / max(num_classes - k, 1)
    dense = rest.expand(-1, num_classes).clone() if k < num_classes else probs.new_zeros(probs.shape[0], num_classes)
    dense.scatter_(1, indices.long(), probs)
    if temperature != 1.0:
        dense = dense.clamp_min(1e-12).pow(1.0 / temperature)
    return dense / dense.sum(dim=1, keepdim=True).clamp_min(1e-12)


def stored_targets(batch: dict, num_classes: int, temperature: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offline labels of a batch of stored views: (teacher distributions, partner labels, mixup weights).

    A stored mixup view keeps its partner's label and its weight, so a label term on it uses both labels;
    a view without mixup is its own partner with weight 1."""
    targets = dense_from_topk(batch["soft_idx"].to(device, non_blocking=True),
                              batch["soft_prob"].to(device, non_blocking=True), num_classes, temperature)
    return (targets, batch["partner_label"].to(device, non_blocking=True),
            batch["lam"].to(device, non_blocking=True).float())
