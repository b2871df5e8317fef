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
    logits: torch.Tensor, labels: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor, smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy against the labels of a mixed batch: λ·CE(y) + (1-λ)·CE(y of the partner)."""
    ce = lambda y: F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=smoothing)  # noqa: E731
    return (lam * ce(labels) + (1 - lam) * ce(labels[partner])).mean()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor | None,
    labels: torch.Tensor,
    partner: torch.Tensor,
    lam: torch.Tensor,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The weighted terms and their sum under `loss`; a zero-weight term is not computed."""
    terms: dict[str, torch.Tensor] = {}
    if kd_weight:
        terms["kd"] = kl_divergence(student_logits, teacher_probs, temperature)
    if ce_weight:
        terms["ce"] = mixed_cross_entropy(student_logits, labels, partner, lam, label_smoothing)
    terms["loss"] = kd_weight * terms.get("kd", 0.0) + ce_weight * terms.get("ce", 0.0)
    return terms


def dense_from_topk(
    indices: torch.Tensor, probs: torch.Tensor, num_classes: int, temperature: float = 1.0
) -> torch.Tensor:
    """Stored top-k teacher probabilities (B, k) as full distributions (B, num_classes), renormalised so the
    mass left out of the top k is not credited to any class. Stored probabilities are at temperature 1;
    softmax(z / T) is proportional to p ** (1 / T), so another temperature is applied here."""
    probs = probs.float()
    if temperature != 1.0:
        probs = probs.clamp_min(1e-12).pow(1.0 / temperature)
    dense = torch.zeros(probs.shape[0], num_classes, device=probs.device).scatter_(1, indices.long(), probs)
    return dense / dense.sum(dim=1, keepdim=True).clamp_min(1e-12)
