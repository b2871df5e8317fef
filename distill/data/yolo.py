"""Ultralytics YOLO detection data: a dataset YAML, image folders or lists, one label `.txt` per image.

    path: ../datasets/shapes       # dataset root: absolute, or relative to the YAML's folder (absent: that folder)
    train: images/train            # a folder of images, a .txt list of image paths, or a list of those
    val: images/val
    names: [circle, square]        # or {0: circle, 1: square}; `nc`, where given, must agree

An image's labels are in the file found by replacing the last `/images/` of its path by `/labels/` and its
extension by `.txt`; each line is `class cx cy w h` normalised by the image's size, or a polygon
`class x1 y1 ... xn yn` (n >= 3) whose extent is its box. An image without a label file has no objects.

Reading 100k label files and image headers takes minutes on a network file system, so a split's parsed
labels and image sizes are cached beside its labels folder (`labels/train.cache`, as Ultralytics does),
keyed by the names, sizes and modification times of its images and label files: a second read stats the
files and loads one array file. Boxes are cached as written (normalised, unclipped), so the checks that
follow (clipping, counts) report the same on every read.
"""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Optional

import numpy as np
import yaml
from PIL import Image

from distill.engine.checkpoint import _atomic_write
from distill.errors import ConfigError

logger = logging.getLogger("distill")

IMAGE_SUFFIXES = {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm"}
CACHE_VERSION = 1
READ_THREADS = 16  # the first read waits on file-system latency, not the CPU: threads overlap the waits
READ_BATCH = 32
IMAGES_DIR, LABELS_DIR = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"


class LabelError(ConfigError):
    """A label file or dataset YAML that does not follow the YOLO format; the message names the file (and line)."""


@dataclass
class YoloDataset:
    yaml_file: Path
    root: Path  # the YAML's `path`: image file names are written relative to it
    names: list[str]
    splits: dict[str, list[str]]  # split key (train, val, test) -> its entries as the YAML gives them


@dataclass
class YoloSplit:
    """One split's images and their boxes (normalised xyxy as written, unclipped)."""

    images: list[str]  # paths
    width: np.ndarray  # (N,) int, 0 where the image header could not be read
    height: np.ndarray
    offsets: np.ndarray  # (N + 1,) image i's boxes are rows offsets[i]:offsets[i + 1]
    boxes: np.ndarray  # (M, 4) float64 normalised x0, y0, x1, y1
    classes: np.ndarray  # (M,) int64
    lines: np.ndarray  # (M,) int32 line number in the label file, for messages
    unreadable: dict[int, str]  # image index -> why its header could not be read
    cache_file: Optional[Path] = None  # where the parsed labels were cached (None: not cached)
    from_cache: bool = False


def read_dataset_yaml(yaml_file: Path) -> YoloDataset:
    """The YAML's root, class names and split entries (the paths are checked when a split is read)."""
    try:
        spec = yaml.safe_load(yaml_file.read_text())
    except yaml.YAMLError as e:
        raise LabelError(f"{yaml_file}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise LabelError(f"{yaml_file}: expected a mapping with path, train, val and names")
    root = Path(spec.get("path") or ".")
    root = root if root.is_absolute() else yaml_file.parent / root
    names = spec.get("names")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise LabelError(f"{yaml_file}: names must map 0..{len(names) - 1} to class names, "
                             f"got keys {sorted(names)}")
        names = [names[i] for i in range(len(names))]
    elif names is None and isinstance(spec.get("nc"), int):
        names = [f"class{i}" for i in range(spec["nc"])]
    if not isinstance(names, list) or not names:
        raise LabelError(f"{yaml_file}: names must be a list of class names or a dict index -> name, got {names!r}")
    if "nc" in spec and spec["nc"] != len(names):
        raise LabelError(f"{yaml_file}: nc is {spec['nc']} but names lists {len(names)} classes")
    splits = {}
    for key in ("train", "val", "test"):
        value = spec.get(key)
        if value:
            splits[key] = [str(v) for v in (value if isinstance(value, list) else [value])]
    return YoloDataset(yaml_file, root, [str(n) for n in names], splits)


def split_images(data: YoloDataset, key: str) -> list[str]:
    """The images of split `key`, in sorted order per entry; a missing key or path is a one-line error."""
    if key not in data.splits:
        raise LabelError(f"{data.yaml_file}: no {key!r} split (the YAML needs a {key}: key naming its images)")
    images = []
    for entry in data.splits[key]:
        path = Path(entry) if Path(entry).is_absolute() else data.root / entry
        if path.is_dir():
            found = sorted(_walk_images(path))
        elif path.is_file() and path.suffix == ".txt":
            found = _listed_images(path, data.root)
        else:
            problem = "is not a folder of images or a .txt list" if path.exists() else "does not exist"
            raise LabelError(f"{data.yaml_file}: {key}: {entry} ({path}) {problem}")
        if not found:
            raise LabelError(f"{data.yaml_file}: {key}: {entry} ({path}) holds no images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        images += found
    return images


def _walk_images(folder: Path | str) -> list[str]:
    out = []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.is_dir():
                out += _walk_images(e.path)
            elif os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES:
                out.append(e.path)
    return out


def _listed_images(list_file: Path, root: Path) -> list[str]:
    """A list file's image paths: `./x` relative to the list's folder, other relative paths to the root."""
    out = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or os.path.splitext(line)[1].lower() not in IMAGE_SUFFIXES:
            continue
        path = Path(line)
        out.append(str(path if path.is_absolute() else (list_file.parent if line.startswith("./") else root) / path))
    return out


def label_path(image: str) -> str:
    """`.../images/a/b.jpg` -> `.../labels/a/b.txt` (the last `/images/` only)."""
    parts = str(image).rsplit(IMAGES_DIR, 1)
    return os.path.splitext(LABELS_DIR.join(parts))[0] + ".txt"


# --------------------------------------------------------------------------------------------------
# Parsing, with the cache
# --------------------------------------------------------------------------------------------------


def read_split(images: list[str], num_classes: int, split: str = "train",
               fallback_cache: Optional[Path] = None) -> YoloSplit:
    """The labels and image sizes of `images`, from the cache when no file changed since it was written.
    The cache is `<split>.cache` beside the labels folder (`labels/train.cache` for `labels/train/*.txt`; named
    after the split, so that splits sharing a folder keep a cache each); where that cannot be written, it is
    `fallback_cache` (if given)."""
    labels = [label_path(p) for p in images]
    key = _files_key(images, labels, num_classes)
    beside = Path(labels[0]).parent.parent / f"{split}.cache"
    places = ([beside] if beside.parent.is_dir() else []) + ([fallback_cache] if fallback_cache else [])
    for place in places:
        cached = _load_cache(place, key, images)
        if cached is not None:
            return cached
    split = _parse(images, labels, num_classes)
    for place in places:
        try:
            _save_cache(place, key, split)
            split.cache_file = place
            break
        except OSError as e:
            logger.info("labels cache not written to %s (%s)", place, e.strerror or e)
    return split


def _stats(paths: list[str]) -> list[tuple[int, int]]:
    """(size, mtime_ns) per path, (-1, 0) where missing; one directory listing per folder."""
    by_folder: dict[str, dict[str, tuple[int, int]]] = {}
    out = []
    for p in paths:
        folder, _, name = str(p).rpartition(os.sep)
        if folder not in by_folder:
            by_folder[folder] = {}
            try:
                with os.scandir(folder or ".") as entries:
                    for e in entries:
                        try:
                            st = e.stat()
                            by_folder[folder][e.name] = (st.st_size, st.st_mtime_ns)
                        except OSError:
                            pass
            except OSError:
                pass
        out.append(by_folder[folder].get(name, (-1, 0)))
    return out


def _files_key(images: list[str], labels: list[str], num_classes: int) -> str:
    """A digest of every image's and label file's name, size and modification time (and the class count)."""
    lines = [f"v{CACHE_VERSION} nc={num_classes}"]
    lines += [f"{image}\0{s[0]}\0{s[1]}\0{t[0]}\0{t[1]}" for image, s, t in zip(images, _stats(images), _stats(labels))]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _load_cache(path: Path, key: str, images: list[str]) -> Optional[YoloSplit]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            unreadable = {int(i): str(m) for i, m in zip(z["bad_index"], z["bad_reason"])}
            return YoloSplit(images, z["width"], z["height"], z["offsets"], z["boxes"], z["classes"], z["lines"],
                             unreadable, path, True)
    except (OSError, KeyError, ValueError):  # absent, unreadable or from another version: parse again
        return None


def _save_cache(path: Path, key: str, split: YoloSplit) -> None:
    bad = sorted(split.unreadable)

    def write(f):
        np.savez(f, key=np.array(key), width=split.width, height=split.height, offsets=split.offsets,
                 boxes=split.boxes, classes=split.classes, lines=split.lines, bad_index=np.array(bad, np.int64),
                 bad_reason=np.array([split.unreadable[i] for i in bad], dtype=str))

    _atomic_write(path, write)


def _parse(images: list[str], labels: list[str], num_classes: int) -> YoloSplit:
    """Every image header and label file, read by a pool of threads: on a network file system each open waits
    a millisecond or more, which threads overlap (the results are taken in order, so the first bad label file
    in split order is the one reported)."""
    width, height = np.zeros(len(images), np.int64), np.zeros(len(images), np.int64)
    offsets = np.zeros(len(images) + 1, np.int64)
    boxes, classes, lines, unreadable = [], [], [], {}
    read = partial(_read_batch, images, labels, num_classes)
    starts = range(0, len(images), READ_BATCH)  # a task per batch: a future per file would cost more than a read
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for first in range(0, len(starts), READ_THREADS * 64):  # a million pending futures would hold GBs
            batches = pool.map(read, starts[first:first + READ_THREADS * 64])
            for i, (size, objects) in enumerate(chain.from_iterable(batches), starts[first]):
                if isinstance(size, str):
                    unreadable[i] = size
                else:
                    width[i], height[i] = size
                for line_no, cls, box in objects:
                    classes.append(cls)
                    boxes.append(box)
                    lines.append(line_no)
                offsets[i + 1] = len(boxes)
    return YoloSplit(images, width, height, offsets, np.asarray(boxes, np.float64).reshape(-1, 4),
                     np.asarray(classes, np.int64), np.asarray(lines, np.int32), unreadable)


def _read_batch(images: list[str], labels: list[str], num_classes: int, start: int) -> list[tuple]:
    """((width, height) or why the header cannot be read, the label file's objects) of images start.. on."""
    out = []
    for image, label in zip(images[start:start + READ_BATCH], labels[start:start + READ_BATCH]):
        try:
            with Image.open(image) as img:  # the header only: pixels are decoded lazily, never here
                size = img.size
        except Exception as e:  # missing, truncated or not an image: the dataset skips it when it is drawn
            size = f"{type(e).__name__}: {e}"
        out.append((size, parse_label_file(label, num_classes)))
    return out


def parse_label_file(path: str, num_classes: int) -> list[tuple[int, int, tuple[float, ...]]]:
    """(line number, class, normalised xyxy) per object of one label file; no file: no objects."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if not (len(fields) == 5 or (len(fields) >= 7 and len(fields) % 2 == 1)):
            raise LabelError(f"{path}:{n}: expected 'class cx cy w h' (5 fields) or a polygon 'class x1 y1 ... xn yn' "
                             f"(n >= 3), got {len(fields)} fields")
        try:
            cls_value, values = float(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise LabelError(f"{path}:{n}: not numbers: {line.strip()!r}") from None
        cls = int(cls_value)
        if cls != cls_value or not 0 <= cls < num_classes:
            raise LabelError(f"{path}:{n}: class {fields[0]} is not one of the {num_classes} classes of names "
                             f"(0..{num_classes - 1})")
        if len(values) == 4:
            cx, cy, w, h = values
            if w < 0 or h < 0:
                raise LabelError(f"{path}:{n}: negative width or height: {line.strip()!r}")
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        else:
            xs, ys = values[0::2], values[1::2]
            box = (min(xs), min(ys), max(xs), max(ys))
        out.append((n, cls, box))
    return out
