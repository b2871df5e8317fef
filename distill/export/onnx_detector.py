"""A fine-tuned RT-DETR as one ONNX graph: normalisation, detector and post-processing (top-K, xyxy pixels).

    python -m distill.export runs/rtdetr_mnv4_conv_s --to onnx --out exported/detector

Inputs: `images` (B, 3, S, S) float RGB in [0, 1] at the run's evaluation side S, and `orig_sizes` (B, 2)
as (width, height) of the original images. Outputs: `scores` (B, K), `labels` (B, K) int64, `boxes`
(B, K, 4) xyxy in original-image pixels. The batch axis is dynamic; the side is fixed (the decoder's
anchors are laid out for it). `model.onnx` is accompanied by `distill.json` (side, normalisation, classes).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from distill.engine.checkpoint import CheckpointMismatch, atomic_write_text, load_checkpoint, load_state_strict
from distill.export.source import resolve_checkpoint

ONNX_NAME = "model.onnx"
INPUTS = ("images", "orig_sizes")
OUTPUTS = ("scores", "labels", "boxes")


def is_detection_source(source: str | Path) -> bool:
    """A detection fine-tuning checkpoint (`model` weights and a config naming a `model.backbone`)."""
    path = resolve_checkpoint(source)
    if not path.is_file():
        return False
    try:
        obj = load_checkpoint(path, mmap=True)
    except CheckpointMismatch:
        return False  # unreadable: the student loader reports it with the file's name
    config = obj.get("config") if isinstance(obj, dict) else None
    model_cfg = config.get("model") if isinstance(config, dict) else None
    return isinstance(model_cfg, dict) and "backbone" in model_cfg and "model" in obj


class ExportedDetector(nn.Module):
    """[0, 1] images → normalised → RT-DETR → top-K detections, all tensors (nothing data-dependent in Python)."""

    def __init__(self, detector: nn.Module, mean, std, num_top: int):
        super().__init__()
        from distill.detection.postprocess import PostProcessor

        self.detector = detector.eval()
        self.post = PostProcessor(num_top)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, orig_sizes: torch.Tensor):
        outputs = self.detector((images - self.mean) / self.std)
        return self.post.detections(outputs["pred_logits"], outputs["pred_boxes"], orig_sizes)


def load_detector(source: str | Path, weights: str = "ema", img_size: Optional[int] = None) -> tuple[nn.Module, dict, Path]:
    """The fine-tuned detector of a detection run, its weights loaded strictly, in eval mode, with its
    anchors fixed for `img_size` (default: the run's evaluation side) and its RepVGG units folded."""
    from distill.detection.rtdetr import RTDETRConfig, build_rtdetr

    path = resolve_checkpoint(source)
    ckpt = load_checkpoint(path)
    key = {"ema": "ema", "student": "model"}[weights]  # `student` names the raw (non-EMA) weights here too
    if ckpt.get(key) is None:
        raise CheckpointMismatch(f"{path} holds no {key!r} weights")
    config = ckpt["config"]
    side = img_size or config.get("data", {}).get("img_size", 640)
    # the backbone's weights are in the checkpoint: build it bare, with no file or hub access
    model_cfg = {**config["model"], "backbone_checkpoint": None, "pretrained_backbone": False,
                 "eval_spatial_size": (side, side)}
    detector = build_rtdetr(RTDETRConfig(**model_cfg))
    load_state_strict(detector, ckpt[key], f"checkpoint {path} ({key} weights)")
    return detector.eval().reparameterize(), {**config, "export_side": side}, path


def export_onnx_detector(
    source: str | Path,
    out: str | Path,
    weights: str = "ema",
    img_size: Optional[int] = None,
    opset: int = 17,
    num_top: Optional[int] = None,
) -> Path:
    if opset < 17:
        raise ValueError(f"opset {opset} is too old: RT-DETR's layer norm and grid sampling need opset 17 or newer")
    detector, config, path = load_detector(source, weights, img_size)
    side = config["export_side"]
    if side % detector.max_stride:
        raise ValueError(f"img_size {side} is not a multiple of the detector's largest stride {detector.max_stride}")
    num_top = num_top or config.get("eval", {}).get("num_top", 300)
    mean, std = detector.mean, detector.std  # what fine-tuning normalised with
    wrapped = ExportedDetector(detector, mean, std, num_top).eval()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    example = (torch.rand(2, 3, side, side), torch.tensor([[side, side]] * 2, dtype=torch.float32))
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter: the one that works with the `onnx` extra alone (no onnxscript). Its
        # tracer warnings here are all about shapes read as Python ints (stride checks, level sizes, top-K
        # count); they are constants once the side is fixed, and the batch axis stays dynamic.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapped, example, str(out / ONNX_NAME), dynamo=False, opset_version=opset,
            input_names=list(INPUTS), output_names=list(OUTPUTS),
            dynamic_axes={name: {0: "batch"} for name in INPUTS + OUTPUTS},
        )
    card = {
        "format": "onnx",
        "file": ONNX_NAME,
        "inputs": {"images": [None, 3, side, side], "orig_sizes": [None, 2]},
        "outputs": list(OUTPUTS),
        "input": {"mean": list(mean), "std": list(std), "img_size": side, "range": "[0, 1] RGB, normalised inside"},
        "num_classes": config["model"].get("num_classes"),
        "num_top": num_top,
        "opset": opset,
        "provenance": {"checkpoint": str(path.resolve()), "weights": weights, "recipe": config.get("recipe"),
                       "backbone": config["model"]["backbone"]},
    }
    atomic_write_text(out / "distill.json", json.dumps(card, indent=2) + "\n")
    return out

