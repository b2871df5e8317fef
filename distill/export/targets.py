"""The export targets by their command-line names, as `module:function`."""
from __future__ import annotations

import importlib
from typing import Callable

# targets that take a pretraining run's student: fn(run: StudentRun, out, **options)
STUDENT_TARGETS = {
    "timm": "distill.export.timm_folder:export_timm",
    "torchvision": "distill.export.torchvision_state:export_torchvision",
    "rtdetr": "distill.export.rtdetr_backbone:export_rtdetr_backbone",
    "hf-rtdetr": "distill.export.hf_rtdetr:export_hf_rtdetr",
}
# targets that take a detection fine-tuning run: fn(source, out, **options)
DETECTOR_TARGETS = {
    "onnx": "distill.export.onnx_detector:export_onnx_detector",
    "hf-rtdetr": "distill.export.hf_detector:export_hf_detector",
    "hf-dfine": "distill.export.hf_detector:export_hf_dfine_detector",
}
TARGETS = {**STUDENT_TARGETS, **DETECTOR_TARGETS}
WEIGHTS = ("ema", "student")  # which weights of a checkpoint


def load_target(targets: dict[str, str], name: str) -> Callable:
    """The export function of target `name`, its module imported now: `--help` needs only the names."""
    module, _, function = targets[name].partition(":")
    return getattr(importlib.import_module(module), function)
