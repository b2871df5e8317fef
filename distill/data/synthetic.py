"""A generated, learnable classification dataset in shard form (the demo's data and the tests').

A class is a combination of shape, colour and fill texture. Classes share some of these with others
(class 0 and 8 are both circles, class 0 and 7 both red), so a teacher's soft labels say something the
hard label does not. Position, scale, rotation, colour tone, background, smaller distractor shapes and
sensor noise vary within a class: a small CNN needs a few hundred steps to do well, not a few.

    out_dir/{train,val}/shard-%06d.tar + manifest.json
    out_dir/extra/...   (extra_per_class > 0) a class-imbalanced pool with object-free images (cls -1),
                        standing in for the unlabelled extra data that gets curated into a balanced set
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np

from distill.data.shapes import PALETTE, PALETTE_NAMES, SHAPES, TEXTURES, draw_shape, random_background
from distill.data.shards import MANIFEST, write_shards

NUM_CLASS_COLOURS = 7  # coprime with len(SHAPES), so (shape, colour) pairs stay distinct for 56 classes
MAX_CLASSES = len(SHAPES) * NUM_CLASS_COLOURS
BACKGROUND_ONLY_SHARE = 0.1  # of the extra pool: images with no class object at all
_SPLITS = ("train", "val", "extra")


def class_attributes(num_classes: int) -> list[tuple[str, int, str]]:
    """(shape, palette index, texture) of each class."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [1, {MAX_CLASSES}], got {num_classes}")
    return [
        (SHAPES[c % len(SHAPES)], c % NUM_CLASS_COLOURS, TEXTURES[(c + c // 4) % len(TEXTURES)])
        for c in range(num_classes)
    ]


def class_names(num_classes: int) -> list[str]:
    return [f"{PALETTE_NAMES[col]} {tex} {shape}" for shape, col, tex in class_attributes(num_classes)]


def render_sample(label: int, attributes: list[tuple[str, int, str]], img_size: int,
                  rng: np.random.Generator) -> np.ndarray:
    """One HWC uint8 image of class `label` (label < 0: distractors only)."""
    image = random_background(img_size, img_size, rng)
    # Distractors first and smaller than the class object, which is drawn on top and stays whole.
    for _ in range(int(rng.integers(0, 4))):
        size = img_size * rng.uniform(0.12, 0.3)
        centre = rng.uniform(0, img_size, size=2)
        draw_shape(image, SHAPES[int(rng.integers(len(SHAPES)))], centre, size,
                   PALETTE[int(rng.integers(len(PALETTE)))], float(rng.uniform(0, 360)),
                   TEXTURES[int(rng.integers(len(TEXTURES)))], rng)
    if label >= 0:
        shape, colour, texture = attributes[label]
        size = img_size * rng.uniform(0.38, 0.75)
        margin = size * 0.35  # up to ~15% of the object may leave the frame
        centre = rng.uniform(margin, img_size - margin, size=2)
        tone = np.clip(np.asarray(PALETTE[colour], np.float32) + rng.normal(0, 14, size=3), 0, 255)
        draw_shape(image, shape, centre, size, tone, float(rng.uniform(0, 360)), texture, rng)
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (3, 3), float(rng.uniform(0.3, 1.0)))
    noise = rng.normal(0, rng.uniform(0, 10), size=image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _labels(split: str, num_classes: int, count: int, rng: np.random.Generator) -> np.ndarray:
    if split != "extra":
        labels = np.repeat(np.arange(num_classes), count)
    else:
        # A skewed class mix, as an uncurated pool has, plus object-free images for curation to drop.
        total = count * num_classes
        shares = rng.dirichlet(np.full(num_classes, 1.5))
        background = int(round(total * BACKGROUND_ONLY_SHARE))
        labels = np.concatenate([rng.choice(num_classes, size=total - background, p=shares),
                                 np.full(background, -1)])
    return rng.permutation(labels)  # every shard holds a mix of classes


def generate_classification(
    out_dir: Union[str, Path],
    num_classes: int = 10,
    train_per_class: int = 200,
    val_per_class: int = 50,
    img_size: int = 64,
    seed: int = 0,
    shard_size: int = 200,
    extra_per_class: int = 0,
) -> dict:
    """Write the dataset's splits as shards under `out_dir`; returns {"root", "params", "splits": manifests}.
    The same arguments give byte-identical shards."""
    params = dict(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class,
                  img_size=img_size, seed=seed, shard_size=shard_size, extra_per_class=extra_per_class)
    attributes = class_attributes(num_classes)
    counts = {"train": train_per_class, "val": val_per_class, "extra": extra_per_class}
    out_dir = Path(out_dir)
    manifests = {}
    for split, seq in zip(_SPLITS, np.random.SeedSequence(seed).spawn(len(_SPLITS))):
        if counts[split] <= 0:
            continue
        rng = np.random.default_rng(seq)
        labels = _labels(split, num_classes, counts[split], rng)
        samples = ((f"{split}-{i:07d}", render_sample(int(y), attributes, img_size, rng), int(y))
                   for i, y in enumerate(labels))
        write_shards(samples, out_dir / split, maxcount=shard_size, mtime=0,
                     extra_manifest={"classes": class_names(num_classes), "generator": params})
        manifests[split] = json.loads((out_dir / split / MANIFEST).read_text())
    return {"root": str(out_dir), "params": params, "splits": manifests}


def _matches(root: Path, params: dict[str, Any]) -> bool:
    for split in ("train", "val") + (("extra",) if params["extra_per_class"] > 0 else ()):
        path = root / split / MANIFEST
        if not path.is_file():
            return False
        try:
            if json.loads(path.read_text()).get("generator") != params:
                return False
        except json.JSONDecodeError:
            return False
    return True


def ensure_demo_dataset(root: Union[str, Path], **kw) -> Path:
    """Generate the dataset at `root` unless one with the same parameters is already there.

    Writes into a sibling temporary folder and renames it into place, so an interrupted run never leaves
    a half-written dataset that looks complete."""
    root = Path(root)
    # 100-sample shards: 20 train shards, enough to split over e.g. 2 processes x 8 loader workers
    params = dict(num_classes=10, train_per_class=200, val_per_class=50, img_size=64, seed=0, shard_size=100,
                  extra_per_class=0)
    unknown = set(kw) - set(params)
    if unknown:
        raise TypeError(f"ensure_demo_dataset: unknown arguments {sorted(unknown)}; valid: {sorted(params)}")
    params.update(kw)
    if _matches(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate_classification(tmp, **params)
        if root.exists():
            old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(root, old)
            os.rename(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# `data.generate` kinds: each writes its set under data.root/<kind> with these arguments to ensure_demo_dataset.
# demo_rich has every (shape, colour) class the generator can draw (56, against the demo's 10), 80 training
# images of each: a pretraining set that covers more than any one downstream task's objects.
GENERATE_KINDS: dict[str, dict[str, Any]] = {
    "demo": {},
    "demo_rich": dict(num_classes=MAX_CLASSES, train_per_class=80, val_per_class=10),
}


def ensure_generated(kind: str, data_root: Union[str, Path]) -> Path:
    """The generated set `kind` (a key of GENERATE_KINDS) at data_root/kind, written if missing."""
    return ensure_demo_dataset(Path(data_root) / kind, **GENERATE_KINDS[kind])
