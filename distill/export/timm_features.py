"""A timm student's weights as timm's own `features_only` backbone, checked against the classifier.

timm maps classifier keys onto its feature wrappers itself (some flatten module names), and drops the head
without complaint; so instead of trusting key names, the result must reproduce the classifier's own
intermediate feature maps (`forward_intermediates`) on a probe image before anything is written.
"""
from __future__ import annotations

import logging
from typing import Sequence

import timm
import torch
from torch import nn

from distill.engine.checkpoint import CheckpointMismatch
from distill.export.source import StudentRun


def student_features(run: StudentRun, out_indices: Sequence[int], images: torch.Tensor) -> list[torch.Tensor]:
    """The classifier's own feature maps at timm `feature_info` indices."""
    with torch.no_grad():
        return run.model.eval().forward_intermediates(images, indices=list(out_indices), intermediates_only=True)


def timm_features(run: StudentRun, out_indices: Sequence[int], probe_side: int = 64) -> nn.Module:
    builder_log = logging.getLogger("timm.models._builder")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)  # it warns about the head's keys, which a backbone drops by design
    try:
        features = timm.create_model(
            run.name,
            features_only=True,
            out_indices=tuple(out_indices),
            pretrained=True,
            pretrained_cfg_overlay={"state_dict": run.model.state_dict()},
        ).eval()
    finally:
        builder_log.setLevel(level)
    probe = torch.rand(1, 3, probe_side, probe_side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = features(probe)
    want = student_features(run, out_indices, probe)
    for level, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise CheckpointMismatch(
                f"timm's features_only {run.name} does not reproduce the student's feature level {level} "
                f"(out_indices {list(out_indices)}): the weights did not all load"
            )
    return features
