"""A generated COCO-format detection set: coloured shapes on textured backgrounds, the class is the shape.

Several objects per image, of sizes spread over COCO's small / medium / large area ranges, placed so
that no object hides much of another (each box stays a faithful label). Colour, rotation and texture
vary within a class, so the detector must learn the shape, not a colour.

    out_dir/{train,val}/images/*.jpg
    out_dir/{train,val}/annotations.json    COCO instances: images, annotations (bbox xywh), categories
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from distill.data.shapes import PALETTE, SHAPES, draw_shape, random_background

DEMO_COMPLETE = ".complete"


def _overlap(box: tuple, others: list[tuple]) -> float:
    """The largest share of either box covered by their intersection, over `others`."""
    worst = 0.0
    for o in others:
        iw = min(box[2], o[2]) - max(box[0], o[0])
        ih = min(box[3], o[3]) - max(box[1], o[1])
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        small = min((box[2] - box[0]) * (box[3] - box[1]), (o[2] - o[0]) * (o[3] - o[1]))
        worst = max(worst, inter / max(small, 1e-6))
    return worst


def _render_image(rng: np.random.Generator, img_size: int, kinds: list[str], max_objects: int):
    image = random_background(img_size, img_size, rng)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(10):
            # log-uniform sides from 12 px to 70% of the image: small, medium and large COCO areas all occur
            size = float(np.exp(rng.uniform(np.log(12), np.log(0.7 * img_size))))
            half = size / 2
            center = (float(rng.uniform(half, img_size - half)), float(rng.uniform(half, img_size - half)))
            guess = (center[0] - half, center[1] - half, center[0] + half, center[1] + half)
            if _overlap(guess, [b for _, b in objects]) < 0.2:
                break
        else:
            continue  # the image is full
        label = int(rng.integers(len(kinds)))
        colour = PALETTE[int(rng.integers(len(PALETTE)))]
        box = draw_shape(image, kinds[label], center, size, colour, float(rng.uniform(0, 360)),
                         bool(rng.random() < 0.5), rng)
        x0, y0, x1, y1 = (float(np.clip(v, 0, img_size)) for v in box)
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            objects.append((label, (x0, y0, x1, y1)))
    return image, objects


def _write_split(folder: Path, count: int, rng: np.random.Generator, img_size: int, kinds: list[str],
                 max_objects: int, first_image_id: int) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image, objects = _render_image(rng, img_size, kinds, max_objects)
        image_id = first_image_id + i
        name = f"{image_id:08d}.jpg"
        Image.fromarray(image).save(folder / "images" / name, quality=92)
        images.append({"id": image_id, "file_name": name, "width": img_size, "height": img_size})
        for label, (x0, y0, x1, y1) in objects:
            w, h = x1 - x0, y1 - y0
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)],
                "area": round(w * h, 2), "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": kind, "supercategory": "shape"} for i, kind in enumerate(kinds)]
    (folder / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )


def generate_coco_shapes(out_dir: str | Path, num_train: int, num_val: int, img_size: int = 256,
                         num_classes: int = 5, max_objects: int = 6, seed: int = 0) -> Path:
    """Write the train and val splits under `out_dir` (category ids 1..num_classes, one per shape kind)."""
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be between 1 and {len(SHAPES)} (shape kinds: {list(SHAPES)})")
    out_dir = Path(out_dir)
    kinds = list(SHAPES)[:num_classes]
    train_rng, val_rng = (np.random.default_rng([seed, split]) for split in (0, 1))
    _write_split(out_dir / "train", num_train, train_rng, img_size, kinds, max_objects, 1)
    _write_split(out_dir / "val", num_val, val_rng, img_size, kinds, max_objects, num_train + 1)
    return out_dir


def ensure_det_demo(root: str | Path, num_train: int = 800, num_val: int = 100, img_size: int = 160,
                    num_classes: int = 3, max_objects: int = 4, seed: int = 0) -> Path:
    """The demo detection set at `root`, generated once: built in a temporary sibling folder and renamed
    into place, so an interrupted run leaves no half-written set behind."""
    root = Path(root)
    if (root / DEMO_COMPLETE).exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        generate_coco_shapes(tmp, num_train, num_val, img_size, num_classes, max_objects, seed)
        (tmp / DEMO_COMPLETE).write_text(json.dumps(
            {"num_train": num_train, "num_val": num_val, "img_size": img_size, "num_classes": num_classes,
             "max_objects": max_objects, "seed": seed}
        ))
        if root.exists():  # an incomplete earlier attempt
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
