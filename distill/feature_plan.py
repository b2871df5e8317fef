"""The feature objective's part of a dry-run plan, from the recipe alone (models built on the meta device: no
weights, no images): which teacher maps the student learns, at what grid, and what storing them would take.

Offline soft labels store a few numbers per view; a feature map stores channels x grid x grid of them, for
every view (a view is a fresh crop and mixup, and the student must learn the teacher's map of that very view).
The plan gives those bytes at fp16, per view, per epoch of views and for the whole run: at ImageNet scale they
come to terabytes per epoch, far beyond the images themselves, which is why the feature objective runs online.
"""
from __future__ import annotations

from typing import Optional

import torch

from distill.feature_objective import check_feature_config, student_feature_points, teacher_feature_points, teacher_pairs
from distill.models.factory import create_model
from distill.models.feature_taps import FeatureTaps

FP16_BYTES = 2


def teacher_map_shapes(cfg, side: int, head: Optional[int]) -> tuple[list[str], list[tuple[int, int, int]]]:
    """(layer names, (C, H, W) of each tapped map) of the teacher at `side` px, on the meta device."""
    with torch.device("meta"):
        model = create_model(cfg.teacher.name, num_classes=head, img_size=side).eval()
        taps = FeatureTaps(model, teacher_feature_points(cfg, model))
        with taps.capturing() as maps, torch.no_grad():
            model(torch.empty(1, 3, side, side))
    return [p.module for p in taps.points], [tuple(int(d) for d in m.shape[1:]) for m in maps]


def feature_plan(cfg, teacher_side: int, head: Optional[int], images: Optional[int], samples: int) -> dict:
    """The plan's `features` entry; ConfigError for feature keys the models cannot meet."""
    check_feature_config(cfg)
    with torch.device("meta"):
        student = create_model(cfg.student.name, num_classes=cfg.student.num_classes)
    student_points = student_feature_points(cfg, student)
    layers, shapes = teacher_map_shapes(cfg, teacher_side, head)
    grids = [(cfg.feature.grid, cfg.feature.grid) if cfg.feature.grid else (h, w) for _, h, w in shapes]
    per_view = sum(c * gh * gw * FP16_BYTES for (c, _, _), (gh, gw) in zip(shapes, grids))
    return {
        "loss": cfg.loss.feature_loss,
        "weight": float(cfg.loss.feature_weight),
        "student_strides": [p.stride for p in student_points],
        "student_channels": [p.channels for p in student_points],
        "teacher_layers": layers,
        "teacher_maps": [list(s) for s in shapes],
        "pairs": teacher_pairs(cfg),
        "grids": [list(g) for g in grids],
        "offline_bytes_per_view_fp16": per_view,
        "offline_bytes_per_epoch_fp16": per_view * images if images else None,
        "offline_bytes_run_fp16": per_view * samples,
        "runs": "online",
    }


def describe_features(f: dict, teacher_side: int) -> list[str]:
    maps = ", ".join(f"{name} {c}x{h}x{w}" for name, (c, h, w) in zip(f["teacher_layers"], f["teacher_maps"]))
    pairs = ", ".join(f"s{s} ({c} ch) -> {f['teacher_layers'][j]}" for s, c, j in
                      zip(f["student_strides"], f["student_channels"], f["pairs"]))
    epoch = f"{_bytes(f['offline_bytes_per_epoch_fp16'])} an epoch of views, " if f["offline_bytes_per_epoch_fp16"] else ""
    return [
        f"  features {f['loss']} x {f['weight']}: teacher maps at {teacher_side} px: {maps}; {pairs}, compared on "
        f"{' / '.join(f'{h}x{w}' for h, w in f['grids'])}",
        f"  features online: stored offline in fp16 they would take {_bytes(f['offline_bytes_per_view_fp16'])} a view, "
        f"{epoch}{_bytes(f['offline_bytes_run_fp16'])} for the run (every view is a new crop and mixup)",
    ]


def _bytes(n: Optional[float]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
