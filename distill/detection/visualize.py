"""A picture of a detector at work: a few validation images with their ground truth and predicted boxes."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

GT_COLOUR = (40, 220, 40)
PRED_COLOUR = (255, 60, 60)


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: Sequence[str], scores: Sequence[float],
                    gt_boxes: np.ndarray = (), gt_labels: Sequence[str] = (), min_side: int = 384) -> Image.Image:
    """Ground truth in green (label above the box), predictions in red (label and score inside). Small images
    are enlarged to `min_side` first so that the labels stay legible."""
    canvas = Image.fromarray(image).convert("RGB")
    scale = max(1.0, min_side / min(canvas.size))
    if scale > 1:
        canvas = canvas.resize((round(canvas.width * scale), round(canvas.height * scale)), Image.BILINEAR)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * scale
    gt_boxes = np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4) * scale
    draw = ImageDraw.Draw(canvas)
    for (x0, y0, x1, y1), name in zip(gt_boxes, gt_labels):
        draw.rectangle([x0, y0, x1, y1], outline=GT_COLOUR, width=1)
        draw.text((x0, max(0, y0 - 10)), name, fill=GT_COLOUR)
    for (x0, y0, x1, y1), name, score in zip(boxes, labels, scores):
        draw.rectangle([x0, y0, x1, y1], outline=PRED_COLOUR, width=2)
        draw.text((x0 + 2, y0 + 1), f"{name} {score:.2f}", fill=PRED_COLOUR)
    return canvas


def save_prediction_grid(dataset, predictions: dict, path: str | Path, num_images: int = 4,
                         score_threshold: float = 0.3, columns: int = 2) -> Path:
    """Draw the first `num_images` images of a `CocoDetection` that have predictions into one PNG.

    `predictions` maps image id → post-processed result (`boxes` abs xyxy, `labels`, `scores`)."""
    tiles = []
    for index, record in enumerate(dataset.images):
        if len(tiles) == num_images:
            break
        result = predictions.get(record["id"])
        if result is None:
            continue
        try:
            image = dataset.read_image(index)
        except Exception:
            continue  # undecodable: nothing to draw on
        keep = result["scores"] >= score_threshold
        gt_xywh, gt_labels = dataset.annotations(index, image.shape[1], image.shape[0])
        gt_xyxy = np.concatenate([gt_xywh[:, :2], gt_xywh[:, :2] + gt_xywh[:, 2:]], 1)
        tiles.append(draw_detections(
            image,
            result["boxes"][keep].numpy(),
            [dataset.class_names[int(c)] for c in result["labels"][keep]],
            result["scores"][keep].tolist(),
            gt_xyxy,
            [dataset.class_names[int(c)] for c in gt_labels],
        ))
    if not tiles:
        raise ValueError("no validation image with predictions to draw")
    width = max(t.width for t in tiles)
    height = max(t.height for t in tiles)
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * width, (i // columns) * height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
