"""Hand-off formats for distilled backbones and fine-tuned detectors.

    python -m distill.export runs/mnv4_conv_s --out exported/mnv4_conv_s                # timm folder
    python -m distill.export runs/shufflenet_v2_x1_0 --out exported/shufflenet          # torchvision state dict
    python -m distill.export runs/mnv4_conv_s --to rtdetr --out exported/mnv4_rtdetr    # + detection recipe
    python -m distill.export runs/mnv4_conv_s --to hf-rtdetr --out exported/mnv4_hf     # transformers RT-DETR
    python -m distill.export runs/rtdetr_mnv4_conv_s --out exported/detector            # ONNX of a detector
    python -m distill.export runs/rtdetr_mnv4_conv_s --to hf-rtdetr --out exported/hf   # the whole detector
    python -m distill.export runs/dfine_elan --to hf-dfine --out exported/hf_dfine        # the same, D-FINE head

Each target is one module holding one `export_*(run, out, ...)` function; `distill.export.targets` maps
the CLI names to them. Every export writes `distill.json` (the backbone card: feature levels, input normalisation and side,
provenance) next to the weights.
"""
from __future__ import annotations

import importlib

# public names → the module defining them; imported on first use, so `python -m distill.export.<module>`
# runs a module that the package has not imported already
_PUBLIC = {
    "StudentRun": "source",
    "load_student": "source",
    "export_timm": "timm_folder",
    "export_torchvision": "torchvision_state",
    "export_rtdetr_backbone": "rtdetr_backbone",
    "export_hf_rtdetr": "hf_rtdetr",
    "export_onnx_detector": "onnx_detector",
    "export_hf_detector": "hf_detector",
    "TARGETS": "targets",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'distill.export' has no attribute {name!r}")
    return getattr(importlib.import_module(f"distill.export.{_PUBLIC[name]}"), name)
