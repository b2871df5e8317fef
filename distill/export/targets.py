"""The export targets by their command-line names."""
from __future__ import annotations

from distill.export.hf_detector import export_hf_detector, export_hf_dfine_detector
from distill.export.hf_rtdetr import export_hf_rtdetr
from distill.export.onnx_detector import export_onnx_detector
from distill.export.rtdetr_backbone import export_rtdetr_backbone
from distill.export.timm_folder import export_timm
from distill.export.torchvision_state import export_torchvision

# targets that take a pretraining run's student: fn(run: StudentRun, out, **options)
STUDENT_TARGETS = {
    "timm": export_timm,
    "torchvision": export_torchvision,
    "rtdetr": export_rtdetr_backbone,
    "hf-rtdetr": export_hf_rtdetr,
}
# targets that take a detection fine-tuning run: fn(source, out, **options)
DETECTOR_TARGETS = {
    "onnx": export_onnx_detector,
    "hf-rtdetr": export_hf_detector,
    "hf-dfine": export_hf_dfine_detector,
}
TARGETS = {**STUDENT_TARGETS, **DETECTOR_TARGETS}
