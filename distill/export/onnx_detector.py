"""A fine-tuned RT-DETR as one ONNX graph: normalisation, detector and post-processing (top-K, xyxy pixels).

    python -m distill.export runs/rtdetr_mnv4_conv_s --to onnx --out exported/detector

The detector goes in its deploy form (RepVGG units fused, batch norms folded; `distill.detection.deploy`),
with either decoder head: D-FINE's traces as RT-DETRv2's does (its weighting function W(n) becomes a constant,
the edge distributions' softmax, integral and location-quality top-k are ordinary ONNX operators).
Inputs: `images` (B, 3, S, S) float RGB in [0, 1] at the run's evaluation side S, and `orig_sizes` (B, 2)
as (width, height) of the original images. Outputs: `scores` (B, K), `labels` (B, K) int64, `boxes`
(B, K, 4) xyxy in original-image pixels. The batch axis is dynamic; the side is fixed (the decoder's
anchors are laid out for it). `model.onnx` is accompanied by `distill.json` (side, normalisation, categories).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from distill.detection.run import is_detection_source, load_detector  # noqa: F401 (the CLI's detection check)
from distill.engine.checkpoint import atomic_write_text

ONNX_NAME = "model.onnx"
INPUTS = ("images", "orig_sizes")
OUTPUTS = ("scores", "labels", "boxes")


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
    run = load_detector(source, weights, img_size or 0, deploy=True)  # anchors fixed for the side; folded
    detector, config, path = run.model, run.config, run.checkpoint
    side = detector.cfg.eval_spatial_size[0]
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
        "head": detector.cfg.head,
        "categories": run.categories,
        "num_top": num_top,
        "opset": opset,
        "provenance": {"checkpoint": str(path.resolve()), "weights": weights, "recipe": config.get("recipe"),
                       "backbone": config["model"]["backbone"]},
    }
    atomic_write_text(out / "distill.json", json.dumps(card, indent=2) + "\n")
    return out

