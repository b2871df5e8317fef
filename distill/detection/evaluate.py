"""COCO box AP of a detector (faster-coco-eval), safe under several processes.

Each process predicts its share of the validation images; the detections are gathered on the main process
alone, written as a COCO results JSON and scored there against the instances file; every process returns
the same metrics. Images that could not be decoded are left out of the scoring (and counted), so a corrupt file
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


def coco_box_metrics(ann_file: str | Path, detections: list[dict], image_ids: Optional[Sequence[int]] = None,
                     by_class: bool = False) -> dict:
    """COCO box metrics of `detections` over `image_ids` (default: every image of `ann_file`).

    A metric with no ground truth of that kind reads -1, COCO's convention. `by_class` adds `per_class` and
    `pr50` (see `class_scores`), read from the same evaluation."""
    from faster_coco_eval import COCO, COCOeval_faster

    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        gt = COCO(str(ann_file))
    ids = sorted(set(image_ids)) if image_ids is not None else sorted(gt.getImgIds())
    if not detections:
        has_gt = len(gt.getAnnIds(imgIds=ids)) > 0
        metrics = {name: (0.0 if has_gt else -1.0) for name in METRIC_NAMES}
        return metrics | (class_scores(gt, ids, None) if by_class else {})
    with quiet:
        dt = gt.loadRes(detections)
        evaluator = COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *a, **k: None, separate_eval=True)
        evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats)}
    return metrics | (class_scores(gt, ids, evaluator) if by_class else {})


def class_scores(gt, image_ids: Sequence[int], evaluator=None) -> dict:
    """Per category, from the evaluator's `precision` array [IoU, recall, category, area, max dets] (area
    all, 100 detections): `per_class` rows {id, name, AP, AP50, gt (non-crowd boxes)} and `pr50`, the
    precision at each recall threshold at IoU 0.5 ({"recall": [...], "precision": [[...] per category]}).
    A category without ground truth reads -1, as in COCO's summary; without an evaluator (no detections)
    every score is 0."""
    if evaluator is None:
        cat_ids, precision, recall = sorted(gt.getCatIds()), None, [i / 100 for i in range(101)]  # COCO's
    else:
        cat_ids, precision = list(evaluator.params.catIds), torch.as_tensor(evaluator.eval["precision"])[..., 0, -1]
        recall = [float(r) for r in evaluator.params.recThrs]
    rows, curves = [], []
    for k, cat in enumerate(cat_ids):
        count = len(gt.getAnnIds(imgIds=list(image_ids), catIds=[cat], iscrowd=False))
        if precision is None:
            ap = ap50 = 0.0 if count else -1.0
            curve = [0.0] * len(recall)
        else:
            p = precision[:, :, k]
            ap, ap50 = (float(x[x > -1].mean()) if (x > -1).any() else -1.0 for x in (p, p[0]))
            curve = p[0].tolist()
        rows.append({"id": int(cat), "name": gt.loadCats([cat])[0].get("name", str(cat)), "AP": ap, "AP50": ap50,
                     "gt": count})
        curves.append(curve)
    return {"per_class": rows, "pr50": {"recall": recall, "precision": curves}}


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
                      ann_file: str | Path, accelerator, out_json: Optional[Path] = None,
                      by_class: bool = False) -> dict:
    """COCO metrics of `model` on the validation loader's images (every process must call this); `by_class`
    adds the per-category scores (`class_scores`) on the main process only."""
    from accelerate.utils import broadcast_object_list

    results, image_ids, skipped = predict(model, loader, postprocess, mean, std, accelerator.device,
                                          accelerator.autocast)
    shares = gather_on_main(accelerator, (to_coco_results(results, image_ids, category_ids), image_ids, skipped))
    payload, details = [None], {}
    if accelerator.is_main_process:
        try:
            metrics, details = score_on_main(shares, ann_file, out_json, by_class)
            payload = [(metrics, None)]
        except Exception as e:  # shared: the other processes would wait for the broadcast until the timeout
            payload = [(None, f"evaluation failed on the main process: {type(e).__name__}: {e}")]
    broadcast_object_list(payload)  # the metrics alone: the detections stay on the main process
    metrics, problem = payload[0]
    if problem:
        raise RuntimeError(problem)
    return metrics | details


def score_on_main(shares: list, ann_file: str | Path, out_json: Optional[Path], by_class: bool) -> tuple[dict, dict]:
    """(metrics, per-class details) of every process's detections; predictions.json written where asked."""
    detections, image_ids, skipped = ([x for share in shares for x in share[i]] for i in range(3))
    if out_json is not None:
        from distill.engine.checkpoint import atomic_write_text

        atomic_write_text(Path(out_json), json.dumps(detections))
    metrics = (coco_box_metrics(ann_file, detections, image_ids, by_class) if image_ids
               else {n: -1.0 for n in METRIC_NAMES})
    metrics |= {"eval_images": len(set(image_ids)), "eval_skipped_images": len(skipped)}
    details = {k: metrics.pop(k) for k in ("per_class", "pr50") if k in metrics}
    if skipped:
        logger.warning("evaluation skipped %d undecodable images: %s", len(skipped), ", ".join(skipped[:10]))
    return metrics, details


def gather_on_main(accelerator, share) -> Optional[list]:
    """Every process's `share` (a picklable object), in process order, on the main process; None on the others,
    which never hold the whole set. On NCCL the objects travel through the current CUDA device, which must be
    this process's own (torch.distributed.gather_object's condition): it is set to the Accelerator's here."""
    if accelerator.num_processes == 1:
        return [share]
    shares = [None] * accelerator.num_processes if accelerator.is_main_process else None
    on_device = torch.cuda.device(accelerator.device) if accelerator.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        torch.distributed.gather_object(share, shares, dst=0)
    return shares
