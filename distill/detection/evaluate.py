"""COCO box AP of a detector (faster-coco-eval), safe under several processes.

Each process predicts its share of the validation images; the detections are gathered on the main process,
written as a COCO results JSON and scored there against the instances file; every process returns the
same metrics. Images that could not be decoded are left out of the scoring (and counted), so a corrupt file
does not show up as missed objects.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from distill.data.coco import targets_to, to_model_input

logger = logging.getLogger("distill")

# the order of COCOeval's `stats`; AP* are the box AP at IoU .50:.95 / .50 / .75 and by object area
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(results: Sequence[dict], image_ids: Sequence[int], category_ids: Sequence[int]) -> list[dict]:
    """Post-processed detections (abs xyxy boxes, contiguous labels) → COCO result entries (xywh, JSON ids)."""
    cats = torch.as_tensor(list(category_ids))
    entries = []
    for result, image_id in zip(results, image_ids):
        boxes = result["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        labels = cats[result["labels"].detach().cpu().long()].tolist()
        scores = result["scores"].detach().float().cpu().tolist()
        entries += [
            {"image_id": int(image_id), "category_id": int(c), "bbox": [round(v, 2) for v in b], "score": round(s, 5)}
            for b, c, s in zip(xywh, labels, scores)
        ]
    return entries


def coco_box_metrics(ann_file: str | Path, detections: list[dict], image_ids: Optional[Sequence[int]] = None) -> dict:
    """COCO box metrics of `detections` over `image_ids` (default: every image of `ann_file`).

    A metric with no ground truth of that kind reads -1, COCO's convention."""
    from faster_coco_eval import COCO, COCOeval_faster

    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        gt = COCO(str(ann_file))
    ids = sorted(set(image_ids)) if image_ids is not None else sorted(gt.getImgIds())
    if not detections:
        has_gt = len(gt.getAnnIds(imgIds=ids)) > 0
        return {name: (0.0 if has_gt else -1.0) for name in METRIC_NAMES}
    with quiet:
        dt = gt.loadRes(detections)
        evaluator = COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *a, **k: None, separate_eval=True)
        evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats)}


@torch.no_grad()
def predict(model: torch.nn.Module, loader, postprocess: Callable, mean, std, device, autocast=None):
    """This process's detections: (post-processed results, their image ids, skipped file names)."""
    model.eval()
    results, image_ids, skipped = [], [], []
    for batch in loader:
        skipped += batch["skipped"]
        if not batch["targets"]:
            continue
        images = to_model_input(batch["images"].to(device, non_blocking=True), mean, std)
        targets = targets_to(batch["targets"], device)
        with autocast() if autocast else contextlib.nullcontext():
            outputs = model(images)
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        outputs = {k: v.float() if torch.is_tensor(v) else v for k, v in outputs.items()}
        results += [{k: v.cpu() for k, v in r.items()} for r in postprocess(outputs, orig_sizes)]
        image_ids += [t["image_id"] for t in targets]
    return results, image_ids, skipped


def evaluate_detector(model, loader, postprocess: Callable, mean, std, category_ids: Sequence[int],
                      ann_file: str | Path, accelerator, out_json: Optional[Path] = None) -> dict:
    """COCO metrics of `model` on the validation loader's images (every process must call this)."""
    from accelerate.utils import broadcast_object_list, gather_object

    results, image_ids, skipped = predict(model, loader, postprocess, mean, std, accelerator.device,
                                          accelerator.autocast)
    detections = gather_object(to_coco_results(results, image_ids, category_ids))
    image_ids = gather_object(image_ids)
    skipped = gather_object(skipped)
    payload = [None]
    if accelerator.is_main_process:
        if out_json is not None:
            from distill.engine.checkpoint import atomic_write_text

            atomic_write_text(Path(out_json), json.dumps(detections))
        metrics = coco_box_metrics(ann_file, detections, image_ids) if image_ids else {n: -1.0 for n in METRIC_NAMES}
        metrics |= {"eval_images": len(set(image_ids)), "eval_skipped_images": len(skipped)}
        if skipped:
            logger.warning("evaluation skipped %d undecodable images: %s", len(skipped), ", ".join(skipped[:10]))
        payload = [metrics]
    broadcast_object_list(payload)
    return payload[0]
