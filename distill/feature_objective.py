"""The feature objective of pretraining: the student's maps at the strides a detector consumes (`feature.strides`)
learn the frozen teacher's maps (`teacher.features`) on the same view, weighted by `loss.feature_weight`,
alone (`loss.kd_weight: 0`) or beside the logit objective.

One teacher pass gives its maps (and its logits when there is a logit term); one student pass gives its
logits and maps (`distill.models.feature_taps`). The student's maps go through the projection heads
(`distill.models.projection`) into the teacher's channels, and `distill.feature_losses` compares them on the
teacher's grid. The teacher runs online: storing its maps for every view is out of reach at ImageNet scale
(the dry-run plan gives the bytes; `distill.feature_plan`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from distill.errors import ConfigError
from distill.feature_losses import feature_loss
from distill.models.feature_taps import FeatureTaps, feature_points, points_at_indices, points_at_strides
from distill.models.projection import ProjectionHeads, attach_projection_heads


def check_feature_config(cfg) -> None:
    """The feature keys that are wrong whatever the models: ConfigError in one line naming the key."""
    if not cfg.loss.feature_weight:
        return
    if cfg.teacher.mode == "offline":
        raise ConfigError("loss.feature_weight needs teacher.mode=online: stored views carry soft labels, not the "
                          "teacher's feature maps (dry_run=N shows what storing those would take)")
    layers, strides = list(cfg.teacher.features), list(cfg.feature.strides)
    if len(layers) not in (1, len(strides)):
        raise ConfigError(f"teacher.features={layers} must name one teacher layer for all student maps or one per "
                          f"entry of feature.strides={strides}")


def teacher_pairs(cfg) -> list[int]:
    """For each student stride, the position of its target among the teacher's tapped layers."""
    n = len(cfg.feature.strides)
    return [0] * n if len(cfg.teacher.features) == 1 else list(range(n))


def teacher_feature_points(cfg, model: nn.Module):
    """The teacher layers of `teacher.features`, distinct and in order (one shared index taps one layer)."""
    points = feature_points(model, f"teacher {cfg.teacher.name}")
    return points_at_indices(points, list(cfg.teacher.features), f"teacher {cfg.teacher.name}", "teacher.features")


def student_feature_points(cfg, model: nn.Module):
    points = feature_points(model, f"student {cfg.student.name}")
    return points_at_strides(points, list(cfg.feature.strides), f"student {cfg.student.name}", "feature.strides")


class FeatureObjective:
    """The pieces of the feature term of one run: the teacher and its taps, the student's taps and heads."""

    def __init__(self, cfg, student: nn.Module, teacher):
        check_feature_config(cfg)
        self.teacher = teacher
        self.teacher_taps = FeatureTaps(teacher.model, teacher_feature_points(cfg, teacher.model))
        self.student_taps = FeatureTaps(student, student_feature_points(cfg, student))
        self.pairs = teacher_pairs(cfg)
        targets = [self.teacher_taps.channels[j] for j in self.pairs]
        self.heads = attach_projection_heads(student, ProjectionHeads(self.student_taps.channels, targets))
        self.kind, self.grid, self.weight = cfg.loss.feature_loss, cfg.feature.grid, float(cfg.loss.feature_weight)
        self.logit_terms = bool(cfg.loss.kd_weight or cfg.loss.ce_weight)

    def teacher_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher's logits and maps on `images` ([0, 1] views, resized and normalised by the teacher)."""
        with self.teacher_taps.capturing() as maps:
            logits = self.teacher(images)
        return logits, [m.clone() for m in maps]  # copies made outside inference mode can enter the loss

    def student_forward(self, student: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The student's logits and maps: one forward of `student` (its DDP wrapper, if any)."""
        with self.student_taps.capturing() as maps:
            logits = student(x)
        return logits, list(maps)

    def add_term(self, terms: dict, logits: torch.Tensor, student_maps, teacher_maps) -> dict:
        """`terms` with "feature" added and in "loss" at its weight. Without a logit term the logits still enter
        the loss, at weight zero: DDP expects a gradient for every student parameter, the classifier's too."""
        terms = dict(terms)
        terms["feature"] = feature_loss(self.heads(student_maps), teacher_maps, self.pairs, self.kind, self.grid)
        terms["loss"] = terms["loss"] + self.weight * terms["feature"]
        if not self.logit_terms:
            terms["loss"] = terms["loss"] + 0.0 * logits.float().sum()
        return terms

    def example_outputs(self, student: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """A forward that reaches every trainable weight, heads included (for DDP's gradient-bucket layout)."""
        logits, maps = self.student_forward(student, x)
        return [logits, *self.heads(maps)]


def build_feature_objective(cfg, student: nn.Module, teacher) -> Optional[FeatureObjective]:
    """The run's feature objective, or None without `loss.feature_weight`. Call it before the EMA copy and the
    optimiser are made: the heads become part of the student."""
    if not cfg.loss.feature_weight:
        return None
    return FeatureObjective(cfg, student, teacher)
