"""A fine-tuned detector handed whole to transformers: an `RTDetrV2ForObjectDetection` folder (`--to hf-rtdetr`,
the RT-DETRv2 head) or a `DFineForObjectDetection` folder (`--to hf-dfine`, the D-FINE head).

    python -m distill.export runs/rtdetr_mnv4_conv_s --to hf-rtdetr --out exported/mnv4_hf_detector
    python -m distill.export runs/dfine_elan --to hf-dfine --out exported/dfine_hf_detector   # D-FINE's neck

    model = AutoModelForObjectDetection.from_pretrained("<folder>")
    processor = RTDetrImageProcessor.from_pretrained("<folder>")
    inputs = processor(images=image, return_tensors="pt")
    detections = processor.post_process_object_detection(model(**inputs), threshold=0.3,
                                                         target_sizes=[image.size[::-1]])

Backbone, neck and decoder carry the run's weights (`distill.detection.hf_convert`); `id2label` holds the
training set's category names and `distill.json` their COCO ids. The image processor resizes to the run's
evaluation side the way fine-tuning evaluated (torchvision bilinear, antialiased) and normalises with the
backbone's mean/std. Before writing, the folder's logits and boxes are checked against this project's
model on a probe image, in float64 (1e-4 of the outputs' scale).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch

from distill.detection.hf_convert import to_transformers, to_transformers_dfine
from distill.detection.run import load_detector
from distill.engine.checkpoint import atomic_write_text


# --to target → (the head it takes, its converter)
HF_HEADS = {"hf-rtdetr": ("rtdetrv2", to_transformers), "hf-dfine": ("dfine", to_transformers_dfine)}


def check_same_outputs(model, hf_model, side: int, rtol: float = 1e-4) -> float:
    """The largest difference of logits and boxes on a probe image, both models run in float64 on copies;
    raises above `rtol` of the outputs' scale (at least 1). In float32 the comparison would measure the CPU
    rather than the conversion: the decoder keeps the top-K of the encoder's proposals, and two proposals within
    float32 rounding of each other come out in either order depending on the machine's kernels."""
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ours = copy.deepcopy(model).double().eval()(x)
        theirs = copy.deepcopy(hf_model).double().eval()(pixel_values=x)
    error, scale = 0.0, 1.0
    for mine, other in ((ours["pred_logits"], theirs.logits), (ours["pred_boxes"], theirs.pred_boxes)):
        error = max(error, (mine - other).abs().max().item())
        scale = max(scale, other.abs().max().item())
    if error > rtol * scale:
        raise ValueError(f"transformers' {type(hf_model).__name__} differs from the detector by {error:.3g} "
                         f"(outputs' scale {scale:.3g}) at {side} px in float64 (see distill.detection.hf_convert "
                         f"for the one known difference, border anchors)")
    return error


def export_hf_detector(source: str | Path, out: str | Path, weights: str = "ema",
                       det_size: Optional[int] = None, target: str = "hf-rtdetr") -> Path:
    from transformers import RTDetrImageProcessor

    run = load_detector(source, weights)
    head, convert = HF_HEADS[target]
    if run.model.cfg.head != head:
        other = next(t for t, (h, _) in HF_HEADS.items() if h == run.model.cfg.head)
        raise ValueError(f"{source} has the {run.model.cfg.head} head (model.head={run.model.cfg.head}); "
                         f"--to {target} takes head={head} only: export it --to {other}")
    side = det_size or run.config.get("data", {}).get("img_size", 640)
    names = [c["name"] for c in run.categories]
    hf_model = convert(run.model, names)
    error = check_same_outputs(run.model, hf_model, side)

    out = Path(out)
    hf_model.save_pretrained(str(out))
    mean, std = list(run.model.mean), list(run.model.std)
    processor = RTDetrImageProcessor(do_resize=True, size={"height": side, "width": side}, resample=2,
                                     do_rescale=True, do_normalize=True, image_mean=mean, image_std=std, do_pad=False)
    processor.save_pretrained(str(out))
    card = {
        "format": f"{target}-detector",
        "architecture": type(hf_model).__name__,
        "categories": run.categories,  # label i is categories[i]; its COCO id for predictions files
        "input": {"mean": mean, "std": std, "img_size": side},
        "check": {"max_abs_difference": error, "side": side},
        "provenance": {"checkpoint": str(run.checkpoint.resolve()), "weights": run.weights,
                       "recipe": run.config.get("recipe"), "backbone": run.model.cfg.backbone},
    }
    atomic_write_text(out / "distill.json", json.dumps(card, indent=2) + "\n")
    return out


def export_hf_dfine_detector(source: str | Path, out: str | Path, weights: str = "ema",
                             det_size: Optional[int] = None) -> Path:
    return export_hf_detector(source, out, weights, det_size, target="hf-dfine")
