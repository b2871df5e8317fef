"""The backbone card: what a detector needs to know about exported weights, and where they came from.

Written as `distill.json` next to the weights (and under the `distill` key of a timm `config.json`):
the model name, the feature levels at strides 8/16/32 (timm `out_indices` or module names, channels,
strides), the input normalisation and resolution, and the run's provenance (teacher, recipe, data mix,
steps, validation top-1).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from distill.engine.checkpoint import atomic_write_text
from distill.export.source import StudentRun
from distill.models.factory import input_spec
from distill.models.features import create_feature_extractor

CARD_NAME = "distill.json"
DETECTOR_STRIDES = (8, 16, 32)


@dataclass
class FeatureLevels:
    """One entry per stride: the deepest layer that still has that stride."""

    strides: list[int]
    channels: list[int]
    modules: list[str]
    out_indices: list[int]  # indices into timm's `feature_info` (empty for torchvision models)


def feature_levels(run: StudentRun, strides: tuple[int, ...] = DETECTOR_STRIDES) -> FeatureLevels:
    """Read off the very feature extractor the detector builds (`distill.models.features`), so the card and
    the detector cannot disagree on which maps are used."""
    extractor = create_feature_extractor(run.name, out_strides=strides)
    if hasattr(extractor, "feature_info"):  # timm
        indices = list(extractor.feature_info.out_indices)
        modules = list(extractor.feature_info.module_name())
    else:
        indices, modules = [], [extractor.stage_names[i] for i in extractor.out_positions]
    return FeatureLevels(list(extractor.strides), list(extractor.channels), modules, indices)


def backbone_card(run: StudentRun, fmt: str, strides: tuple[int, ...] = DETECTOR_STRIDES) -> dict:
    spec = input_spec(run.model)
    data = run.config.get("data", {})
    top1_key = {"ema": "student_ema_top1", "student": "student_top1"}.get(run.weights)
    return {
        "format": fmt,
        "model": run.name,
        "num_classes": run.num_classes,
        "weights": run.weights,
        "features": asdict(feature_levels(run, strides)),
        "input": {
            "mean": list(spec.mean),
            "std": list(spec.std),
            "img_size": data.get("img_size", spec.img_size),  # the side the student was distilled at
            "crop_pct": data.get("val_crop_pct"),
        },
        "provenance": {
            "checkpoint": str(run.checkpoint.resolve()),
            "step": run.step,
            "recipe": run.config.get("recipe") or run.summary.get("recipe"),
            "teacher": run.config.get("teacher", {}).get("name"),
            "data_mix": data.get("mix"),
            "steps": run.summary.get("steps", run.step),
            # validation top-1 of the exported weights; only when summary.json describes this checkpoint
            "top1": run.summary.get(top1_key) if top1_key and run.summary.get("steps") == run.step else None,
            "student_top1": run.summary.get("student_top1"),
            "student_ema_top1": run.summary.get("student_ema_top1"),
            "teacher_top1": run.summary.get("teacher_top1"),
        },
    }


def write_card(folder: Path, card: dict) -> Path:
    path = Path(folder) / CARD_NAME
    atomic_write_text(path, json.dumps(card, indent=2) + "\n")
    return path

