"""A generated detection set unlike the detection demo's, in Ultralytics YOLO layout: a "custom" set to
fine-tune on after pretraining on other data.

The demo draws the shapes module's eight regular outlines on smooth backgrounds; here the objects are
irregular textured blobs, letters, discs with holes and crescents, on fractal-noise backgrounds littered with
strokes and outlines that are not objects, with sides from 10 px to 60% of the image and aspect ratios up to
2:1. A class is the object kind; colour, texture, rotation, stretch and scale vary within it.

    out_dir/data.yaml                      path: ., train/val image folders, names
    out_dir/images/{train,val}/*.jpg
    out_dir/labels/{train,val}/*.txt       `class cx cy w h`, normalised by the image's size
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image

from distill.data.shapes import PALETTE, TEXTURES, _PATTERNS, _secondary
from distill.data.synthetic_coco import DEMO_COMPLETE, _overlap

KINDS: tuple[str, ...] = ("blob", "letter", "holed_disc", "crescent")
_LETTERS = "AEFHKMRWXZ"
_MIN_SIDE = 10


def _blob(mask: np.ndarray, rng: np.random.Generator) -> None:
    """A smooth irregular outline: a radius that wanders with the angle (a few low harmonics)."""
    h, w = mask.shape
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    radius = np.ones_like(t)
    for k in (2, 3, 4):
        radius += rng.uniform(0.05, 0.22) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    radius /= radius.max()
    points = np.stack([w / 2 + radius * np.cos(t) * (w / 2 - 1), h / 2 + radius * np.sin(t) * (h / 2 - 1)], 1)
    cv2.fillPoly(mask, np.round(points * 16).astype(np.int32)[None], 255, cv2.LINE_AA, 4)


def _letter(mask: np.ndarray, rng: np.random.Generator) -> None:
    """A bold capital, stretched to the window."""
    glyph = _LETTERS[int(rng.integers(len(_LETTERS)))]
    font = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX)[int(rng.integers(3))]
    (tw, th), base = cv2.getTextSize(glyph, font, 2.0, 9)
    canvas = np.zeros((th + base + 12, tw + 12), np.uint8)
    cv2.putText(canvas, glyph, (6, th + 6), font, 2.0, 255, 9, cv2.LINE_AA)
    ys, xs = np.nonzero(canvas)
    canvas = canvas[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    mask[:] = cv2.resize(canvas, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_AREA)


def _holed_disc(mask: np.ndarray, rng: np.random.Generator) -> None:
    """An ellipse with two to four round holes punched through it (the background shows in them)."""
    h, w = mask.shape
    cv2.ellipse(mask, ((w / 2, h / 2), (w - 2, h - 2), 0), 255, -1, cv2.LINE_AA)
    for _ in range(int(rng.integers(2, 5))):
        a, r = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.5)
        cx, cy = w / 2 + r * math.cos(a) * w / 2, h / 2 + r * math.sin(a) * h / 2
        radius = max(min(w, h) * rng.uniform(0.09, 0.16), 1.0)
        cv2.circle(mask, (int(round(cx * 16)), int(round(cy * 16))), int(round(radius * 16)), 0, -1,
                   cv2.LINE_AA, 4)


def _crescent(mask: np.ndarray, rng: np.random.Generator) -> None:
    """A disc with an offset disc taken out of it."""
    h, w = mask.shape
    cv2.ellipse(mask, ((w / 2, h / 2), (w - 2, h - 2), 0), 255, -1, cv2.LINE_AA)
    shift = rng.uniform(0.3, 0.5)
    cv2.ellipse(mask, ((w / 2 + shift * w, h / 2), (w * 0.9, h * 0.9), 0), 0, -1, cv2.LINE_AA)


_DRAW = {"blob": _blob, "letter": _letter, "holed_disc": _holed_disc, "crescent": _crescent}
assert set(_DRAW) == set(KINDS)


def natural_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Fractal colour noise (octaves of upsampled noise) with strokes and hollow outlines as clutter: edges
    and blobs of colour everywhere, so that an object is found by its form, not by being the only edge."""
    img = np.zeros((size, size, 3), np.float32)
    base = rng.uniform(50, 200, size=3)
    for octave, cells in enumerate((3, 6, 12, 24)):
        noise = rng.normal(0, 45 / (octave + 1), size=(cells, cells, 3)).astype(np.float32)
        img += cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    img += base
    for _ in range(int(rng.integers(3, 9))):  # clutter: lines, arcs and rectangle outlines
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        p = rng.uniform(0, size, size=4).astype(int)
        thickness = int(rng.integers(1, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            cv2.line(img, (p[0], p[1]), (p[2], p[3]), colour, thickness, cv2.LINE_AA)
        elif kind == 1:
            axes = (int(rng.integers(4, size // 3)), int(rng.integers(4, size // 3)))
            cv2.ellipse(img, (p[0], p[1]), axes, float(rng.uniform(0, 180)), 0, float(rng.uniform(90, 300)),
                        colour, thickness, cv2.LINE_AA)
        else:
            cv2.rectangle(img, (p[0], p[1]), (p[2], p[3]), colour, thickness, cv2.LINE_AA)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_object(image: np.ndarray, kind: str, box: tuple[float, float, float, float], angle: float,
                 rng: np.random.Generator) -> tuple[float, float, float, float] | None:
    """Draw `kind` stretched to `box` (before rotation by `angle`), textured; its tight box, or None if too
    little of it is visible."""
    x0, y0, x1, y1 = box
    w, h = max(int(round(x1 - x0)), 3), max(int(round(y1 - y0)), 3)
    local = np.zeros((h, w), np.uint8)
    _DRAW[kind](local, rng)
    side = int(math.ceil(math.hypot(w, h))) + 2  # room to rotate
    mask = np.zeros((side, side), np.uint8)
    oy, ox = (side - h) // 2, (side - w) // 2
    mask[oy:oy + h, ox:ox + w] = local
    rot = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
    mask = cv2.warpAffine(mask, rot, (side, side), flags=cv2.INTER_LINEAR)
    left, top = int(round((x0 + x1) / 2 - side / 2)), int(round((y0 + y1) / 2 - side / 2))
    size = image.shape[0]
    sx0, sy0, sx1, sy1 = max(left, 0), max(top, 0), min(left + side, size), min(top + side, size)
    if sx1 <= sx0 or sy1 <= sy0:
        return None
    mask = mask[sy0 - top:sy1 - top, sx0 - left:sx1 - left]
    colour = np.clip(np.asarray(PALETTE[int(rng.integers(len(PALETTE)))], np.float32) + rng.normal(0, 15, 3),
                     0, 255)
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    fill = np.broadcast_to(colour, mask.shape + (3,))
    if texture != "solid":
        pattern = _PATTERNS[texture](mask.shape[0], mask.shape[1], max(min(w, h) / rng.uniform(3, 5), 1.5),
                                     float(rng.uniform(0, 180)))
        fill = np.where(pattern[..., None], _secondary(colour), colour)
    alpha = mask.astype(np.float32)[..., None] / 255.0
    window = image[sy0:sy1, sx0:sx1]
    window[:] = np.clip(window * (1 - alpha) + fill * alpha + 0.5, 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(mask >= 128)
    if len(xs) == 0:
        return None
    out = (float(xs.min() + sx0), float(ys.min() + sy0), float(xs.max() + 1 + sx0), float(ys.max() + 1 + sy0))
    return out if min(out[2] - out[0], out[3] - out[1]) >= 3 else None


def render_image(rng: np.random.Generator, size: int, max_objects: int) -> tuple[np.ndarray, list]:
    """One image and its objects [(class, (x0, y0, x1, y1))], boxes in pixels."""
    image = natural_background(size, rng)
    objects: list = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(10):
            side = float(np.exp(rng.uniform(np.log(_MIN_SIDE), np.log(0.6 * size))))
            aspect = float(np.exp(rng.uniform(-np.log(2), np.log(2))))
            w, h = side * math.sqrt(aspect), side / math.sqrt(aspect)
            cx, cy = rng.uniform(w / 2, size - w / 2 + 1e-6), rng.uniform(h / 2, size - h / 2 + 1e-6)
            guess = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            if _overlap(guess, [b for _, b in objects]) < 0.2:
                break
        else:
            continue
        label = int(rng.integers(len(KINDS)))
        box = _draw_object(image, KINDS[label], guess, float(rng.uniform(-40, 40)), rng)
        if box is not None:
            objects.append((label, box))
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (3, 3), float(rng.uniform(0.3, 1.0)))
    noise = rng.normal(0, rng.uniform(0, 8), size=image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), objects


def _write_split(root: Path, split: str, count: int, rng: np.random.Generator, size: int,
                 max_objects: int) -> None:
    images, labels = root / "images" / split, root / "labels" / split
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(count):
        image, objects = render_image(rng, size, max_objects)
        Image.fromarray(image).save(images / f"{i:06d}.jpg", quality=92)
        lines = [f"{c} {(x0 + x1) / 2 / size:.6f} {(y0 + y1) / 2 / size:.6f} {(x1 - x0) / size:.6f} "
                 f"{(y1 - y0) / size:.6f}" for c, (x0, y0, x1, y1) in objects]
        (labels / f"{i:06d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))


def generate_custom_det(out_dir: str | Path, num_train: int = 300, num_val: int = 600, img_size: int = 128,
                        max_objects: int = 5, seed: int = 0) -> Path:
    """Write the set under `out_dir` (its split folders must not exist yet); the same arguments give the same
    files."""
    out_dir = Path(out_dir)
    for split, count, rng in (("train", num_train, np.random.default_rng([seed, 0])),
                              ("val", num_val, np.random.default_rng([seed, 1]))):
        _write_split(out_dir, split, count, rng, img_size, max_objects)
    spec = {"path": ".", "train": "images/train", "val": "images/val", "names": list(KINDS)}
    (out_dir / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out_dir


def ensure_custom_det(root: str | Path, **kw) -> Path:
    """The set at `root`, generated once (in a temporary sibling renamed into place, so an interrupted run
    leaves nothing that looks complete); returns the path of its data.yaml."""
    root = Path(root)
    if (root / DEMO_COMPLETE).exists():
        return root / "data.yaml"
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        generate_custom_det(tmp, **kw)
        (tmp / DEMO_COMPLETE).write_text(json.dumps(kw))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / "data.yaml"
