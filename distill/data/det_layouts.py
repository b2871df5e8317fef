"""Which detection layout `data.root` holds, and each split of it as an images folder + a COCO instances file.

    data.root=data/coco                # COCO: data.train_images / train_ann / val_images / val_ann under it
    data.root=datasets/x/data.yaml     # Ultralytics YOLO (or the folder holding exactly one dataset YAML)
    data.root=exports/x                # Roboflow COCO: train/ valid/ [test/], each with _annotations.coco.json
    data.root=exports/x                # CVAT COCO 1.0: annotations/instances_<subset>.json beside images/
    data.root=exports/x                # Label Studio COCO: train/ and val/, each result.json beside images/

`data.format=auto` (the default) tells them apart from the files alone, the COCO layout first when
`root/data.train_ann` exists; `data.format` names one to skip the guessing. Every layout but the COCO one
is converted into plain COCO instances, written into the run folder (`<run>/data/{train,val}.json`, by the
main process; the others wait for it), which the detection dataset and the COCO evaluation then read.
Only the training and validation splits are read (a `test` split is not used in fine-tuning).

What bad input does (each says what and where in one line):
- a malformed label line, a class outside the class names, a missing split: an error, nothing written;
- a box reaching outside its image: clipped to the image (one dropped where nothing of it is left), with one
  warning per split giving the count and one example; never silently, never an error, since exporters round
  boxes a pixel over the border routinely;
- an image that cannot be read: kept in the annotations, its boxes dropped where its size is unknown; the
  dataset skips it when drawn (training takes the next image) and the run lists it in summary.json's
  `skipped_files`, as for a COCO set; one warning per split names the count and an example;
- a training split without a single box: a warning (it would train on background alone).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from distill.data import yolo
from distill.data.coco import CocoFormatError
from distill.data.formats import FORMATS
from distill.data.coco_exports import normalise_export, read_export, roboflow_placeholder
from distill.engine.checkpoint import atomic_write_text
from distill.errors import ConfigError

logger = logging.getLogger("distill")

SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation")}
NAMES = {"coco": "COCO", "yolo": "YOLO", "roboflow": "Roboflow COCO", "cvat": "CVAT COCO", "labelstudio":
         "Label Studio COCO"}


class DataLayoutError(ConfigError):
    """`data.root` holds no layout this reader knows, or a layout with a split missing."""


@dataclass
class SplitFiles:
    image_dir: Path  # the annotation file's `file_name`s are relative to it
    ann_file: Path


@dataclass
class DetectionData:
    layout: str  # one of FORMATS but auto
    train: SplitFiles
    val: SplitFiles


def prepare_detection_data(data_cfg, out_dir: Path, is_main: bool) -> DetectionData:
    """Every process finds the layout; a COCO layout is read where it is. Any other is converted by the main
    process, and every process gets the result, or the main process's error (none waits for ever)."""
    from distill.engine.distributed import broadcast_from_main

    fmt = data_cfg.get("format", "auto")
    if (detect_format(Path(data_cfg.root), data_cfg) if fmt == "auto" else fmt) == "coco":
        return resolve_layout(data_cfg, Path(out_dir))  # nothing to convert: no process waits for another
    # Converting a large set can take longer than a collective may wait, so the others wait outside one: after a
    # quick broadcast of a fresh token, they poll for the markers the main process writes, one as it starts (on
    # a run folder that is not shared by every node it never shows, and they stop in one line) and one when it
    # is done or failed (the token tells this run's markers from an earlier run's).
    started, ready = (Path(out_dir) / "data" / name for name in ("started.json", "ready.json"))
    token = secrets.token_hex(16) if is_main else None
    token = broadcast_from_main(token)
    if not is_main:
        wait_for(started, token, SHARED_WAIT_S, f"{started} never appeared: output_dir={out_dir} must be on a file "
                 f"system that every node shares (the main process converts the annotations into it)")
        return data_from(wait_for(ready, token, CONVERT_WAIT_S, f"the main process did not finish preparing the "
                                  f"annotations within {CONVERT_WAIT_S / 3600:g} h (it writes {ready})"))
    atomic_write_text(started, json.dumps({"token": token}))
    try:
        result = resolve_layout(data_cfg, Path(out_dir))
    except BaseException as e:  # an interrupt too: the others are told rather than left waiting
        with contextlib.suppress(OSError):
            atomic_write_text(ready, json.dumps({"token": token, "error": f"{type(e).__name__}: {e}"}))
        raise
    atomic_write_text(ready, json.dumps({"token": token, "data": asdict(result)}, default=str))
    return result


SHARED_WAIT_S = 300.0  # for the main process's first marker: file-system caches, not work, delay it
CONVERT_WAIT_S = 6 * 3600.0  # for the converted annotations: far beyond the largest set's conversion


def wait_for(marker: Path, token: str, limit_s: float, timeout_message: str, poll_s: float = 2.0) -> dict:
    """`marker`'s content once it holds `token`; says every minute that it waits, and gives up after `limit_s`
    with `timeout_message`. A marker holding an error raises it."""
    started = said = time.monotonic()
    while (found := read_marker(marker, token)) is None:
        now = time.monotonic()
        if now - started >= limit_s:
            raise ConfigError(timeout_message)
        if now - said >= 60:
            said = now
            logger.warning("data: still waiting for the main process to prepare the annotations (%.0f min; "
                           "it writes %s)", (now - started) / 60, marker)
        time.sleep(poll_s)
    if "error" in found:
        raise ConfigError(f"the main process could not read the data: {found['error']}")
    return found


def data_from(found: dict) -> DetectionData:
    d = found["data"]
    return DetectionData(d["layout"], *(SplitFiles(Path(d[k]["image_dir"]), Path(d[k]["ann_file"]))
                                        for k in ("train", "val")))


def read_marker(marker: Path, token: str) -> Optional[dict]:
    """The marker's content where it is this run's (holds `token`); None where absent, partial or stale."""
    try:
        ready = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return ready if isinstance(ready, dict) and ready.get("token") == token else None


def resolve_layout(data_cfg, out_dir: Path) -> DetectionData:
    root = Path(data_cfg.root)
    fmt = data_cfg.get("format", "auto")
    fmt = detect_format(root, data_cfg) if fmt == "auto" else fmt
    if fmt == "coco":
        logger.info("data: COCO layout in %s (%s, %s)", root, data_cfg.train_ann, data_cfg.val_ann)
        return DetectionData("coco", SplitFiles(root / data_cfg.train_images, root / data_cfg.train_ann),
                             SplitFiles(root / data_cfg.val_images, root / data_cfg.val_ann))
    splits = read_yolo(root, out_dir) if fmt == "yolo" else read_exports(root, fmt)
    files, counts = {}, []
    for key, (coco, image_dir, where, origin) in splits.items():
        check_split(key, coco, where, origin)
        ann_file = out_dir / "data" / f"{key}.json"
        atomic_write_text(ann_file, json.dumps(coco))
        files[key] = SplitFiles(image_dir, ann_file)
        used = {a["category_id"] for a in coco["annotations"]}
        counts.append(f"{key} {len(coco['images'])} images, {len(coco['annotations'])} boxes, {len(used)} classes")
    names = [c["name"] for c in sorted(splits["train"][0]["categories"], key=lambda c: c["id"])]
    logger.info("data: %s layout in %s: %s; %d classes: %s", NAMES[fmt], root, "; ".join(counts), len(names),
                ", ".join(names) if len(names) <= 20 else ", ".join(names[:20]) + ", ...")
    return DetectionData(fmt, files["train"], files["val"])


def detect_format(root: Path, data_cfg) -> str:
    if root.is_file():
        if root.suffix in (".yaml", ".yml"):
            return "yolo"
        raise DataLayoutError(f"data.root={root} is a file but not a YOLO dataset YAML (.yaml)")
    if not root.is_dir():
        raise DataLayoutError(f"data.root={root} does not exist")
    if (root / data_cfg.train_ann).is_file():
        return "coco"
    if split_folder(root, "train", "_annotations.coco.json"):
        return "roboflow"
    if list(root.glob("annotations/instances_*.json")) or list(root.glob("*/annotations/instances_*.json")):
        return "cvat"
    if (root / "result.json").is_file() or split_folder(root, "train", "result.json"):
        return "labelstudio"
    if yolo_yamls(root):
        return "yolo"
    raise DataLayoutError(
        f"data.root={root}: no detection layout found: looked for {data_cfg.train_ann} (COCO), a dataset YAML "
        "(YOLO), train/_annotations.coco.json (Roboflow), annotations/instances_*.json (CVAT), train/result.json "
        "(Label Studio); set data.format to say which")


def split_folder(root: Path, key: str, marker: str) -> Optional[Path]:
    for name in SPLIT_NAMES[key]:
        if (root / name / marker).is_file():
            return root / name
    return None


# --------------------------------------------------------------------------------------------------
# YOLO
# --------------------------------------------------------------------------------------------------


def yolo_yamls(folder: Path) -> list[Path]:
    """The dataset YAMLs of a folder: mappings with a `train` and `names` (or `nc`)."""
    import yaml

    found = []
    for path in sorted(folder.glob("*.y*ml")):
        try:
            spec = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            continue
        if isinstance(spec, dict) and "train" in spec and ("names" in spec or "nc" in spec):
            found.append(path)
    return found


def read_yolo(root: Path, out_dir: Path) -> dict:
    if root.is_dir():
        found = yolo_yamls(root)
        if len(found) != 1:
            raise DataLayoutError(f"data.root={root}: expected one YOLO dataset YAML in the folder, found "
                                  f"{[p.name for p in found] or 'none'}; name the YAML in data.root")
        root = found[0]
    try:
        data = yolo.read_dataset_yaml(root.absolute())
    except (KeyError, TypeError, AttributeError) as e:  # e.g. `path: 3`
        raise yolo.LabelError(f"{root}: not a YOLO dataset YAML ({type(e).__name__}: {e})") from None
    out = {}
    for key in ("train", "val"):
        images = yolo.split_images(data, key)
        split = yolo.read_split(images, len(data.names), key, out_dir / "data" / f"{key}.labels.cache")
        if split.from_cache:
            logger.info("data: %s labels read from the cache %s", key, split.cache_file)
        out[key] = yolo_to_coco(split, data.names, data.root) + (f"{data.yaml_file} ({key})",)
    return out


def yolo_to_coco(split: yolo.YoloSplit, names: list[str], root: Path) -> tuple[dict, Path, Callable]:
    """COCO instances of a YOLO split (category id = YOLO class index; image ids from 1, in split order) and
    where each annotation came from. An unreadable image keeps no boxes (their size in pixels is unknown)."""
    prefix = os.path.join(str(root), "")
    images = [{"id": i + 1, "file_name": path[len(prefix):] if path.startswith(prefix) else os.path.abspath(path),
               "width": int(w), "height": int(h)}
              for i, (path, w, h) in enumerate(zip(split.images, split.width, split.height))]
    owner = np.repeat(np.arange(len(split.images)), np.diff(split.offsets))
    sources = np.flatnonzero(~np.isin(owner, list(split.unreadable)))
    size = np.stack([split.width, split.height], 1)[owner[sources]].astype(np.float64)
    xyxy = split.boxes[sources] * np.concatenate([size, size], 1)
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)
    annotations = [{"id": int(k) + 1, "image_id": int(i) + 1, "category_id": int(c), "bbox": box,
                    "area": box[2] * box[3], "iscrowd": 0}
                   for k, i, c, box in zip(sources, owner[sources], split.classes[sources], xywh.tolist())]
    categories = [{"id": c, "name": n} for c, n in enumerate(names)]
    coco = {"images": images, "annotations": annotations, "categories": categories,
            "_unreadable": [f"{split.images[i]} ({reason})" for i, reason in sorted(split.unreadable.items())]}

    def where(a: int) -> str:
        k = int(sources[a])
        return f"{yolo.label_path(split.images[owner[k]])}:{int(split.lines[k])}"

    return coco, root, where


# --------------------------------------------------------------------------------------------------
# Tools' COCO exports
# --------------------------------------------------------------------------------------------------


def read_exports(root: Path, fmt: str) -> dict:
    out, drop = {}, None
    for key in ("train", "val"):
        ann_file, image_dir, search = export_split(root, fmt, key)
        raw = read_export(ann_file)
        if fmt == "roboflow" and key == "train":  # the training split's placeholder is the validation split's
            drop = roboflow_placeholder(raw)
        try:
            coco, missing = normalise_export(raw, ann_file, image_dir, search, drop)
        except (KeyError, TypeError, AttributeError) as e:  # an entry without its id, a bbox of strings, ...
            raise CocoFormatError(f"{ann_file}: not COCO instances ({type(e).__name__}: {e})") from None
        coco["_unreadable"] = [f"{m} (not found under {', '.join(map(str, search))})" for m in missing]
        out[key] = (coco, image_dir, lambda a, c=coco, f=ann_file: f"{f}: annotation {c['annotations'][a]['id']}",
                    str(ann_file))
    return out


def export_split(root: Path, fmt: str, key: str) -> tuple[Path, Path, list[Path]]:
    """(annotation file, folder the written file names are relative to, folders to look images up in)."""
    if fmt == "roboflow":
        folder = split_folder(root, key, "_annotations.coco.json")
        if folder is None:
            raise DataLayoutError(missing_split(root, key, "_annotations.coco.json"))
        return folder / "_annotations.coco.json", folder, [folder, folder / "images"]
    if fmt == "labelstudio":
        folder = split_folder(root, key, "result.json")
        if folder is None:
            alone = " (a Label Studio export holds one split: put one export per split in train/ and val/)" \
                if (root / "result.json").is_file() else ""
            raise DataLayoutError(missing_split(root, key, "result.json") + alone)
        return folder / "result.json", folder, [folder, folder / "images"]
    # CVAT: one instances file per subset in annotations/, or one export per split folder
    for name in SPLIT_NAMES[key]:
        files = [p for p in (root / "annotations").glob("instances_*.json") if p.stem[10:].lower() == name]
        if files:  # instances_<subset>.json, its images in images/<subset>/ (or images/)
            return files[0], root, [root / "images" / files[0].stem[10:], root / "images", root]
        per_split = sorted((root / name / "annotations").glob("instances_*.json"))
        if len(per_split) == 1:
            return per_split[0], root / name, [root / name / "images", root / name]
    subsets = sorted(p.name for p in (root / "annotations").glob("instances_*.json"))
    raise DataLayoutError(f"data.root={root}: no {key} split of the CVAT export: looked for annotations/instances_"
                          f"{{{','.join(SPLIT_NAMES[key])}}}.json and {{{','.join(SPLIT_NAMES[key])}}}/annotations/"
                          f"instances_*.json (found: {subsets or 'none'}); export the {key} subset")


def missing_split(root: Path, key: str, marker: str) -> str:
    looked = ", ".join(str(root / name / marker) for name in SPLIT_NAMES[key])
    return f"data.root={root}: no {key} split: none of {looked} exists"


# --------------------------------------------------------------------------------------------------
# Checks common to the converted layouts
# --------------------------------------------------------------------------------------------------


def check_split(key: str, coco: dict, where: Callable[[int], str], origin: str) -> None:
    """Clip boxes to their image (and say so), report unreadable images, warn of a training split without
    boxes. `coco` is changed in place."""
    unreadable = coco.pop("_unreadable")
    if unreadable:
        logger.warning("data: %d images of %s cannot be read, e.g. %s; they are skipped when drawn and "
                       "listed in the run's skipped files (their boxes are dropped where their size is unknown)",
                       len(unreadable), origin, unreadable[0])
    clipped, dropped, example = clip_to_images(coco, where)
    if clipped:
        logger.warning("data: %d boxes of %s reach outside their image and are clipped to it (%d wholly outside, "
                       "dropped), e.g. %s", clipped, origin, dropped, example)
    if key == "train" and not coco["annotations"]:
        logger.warning("data: the training split %s has no boxes at all: its %d images would all train as "
                       "background; check that its labels are where the layout expects them", origin,
                       len(coco["images"]))


def clip_to_images(coco: dict, where: Callable[[int], str]) -> tuple[int, int, Optional[str]]:
    """Clip every box to its image; drop those with nothing left. (clipped, dropped, first clipped's origin).
    A box over the border by less than 1/10000 of the side is clipped without counting (float rounding);
    a box of an image of unknown size is left as it is (the dataset clips it when it reads the image)."""
    anns = coco["annotations"]
    if not anns:
        return 0, 0, None
    size_of = {im["id"]: (im["width"] or 0, im["height"] or 0) for im in coco["images"]}
    wh = np.array([size_of[a["image_id"]] for a in anns], np.float64).reshape(-1, 2)
    b = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
    known = (wh > 0).all(1)
    x0, y0 = np.maximum(b[:, 0], 0), np.maximum(b[:, 1], 0)
    x1, y1 = np.minimum(b[:, 0] + b[:, 2], wh[:, 0]), np.minimum(b[:, 1] + b[:, 3], wh[:, 1])
    tol = 1e-4 * wh.max(1)
    outside = known & ((b[:, 0] < -tol) | (b[:, 1] < -tol) | (b[:, 0] + b[:, 2] > wh[:, 0] + tol)
                       | (b[:, 1] + b[:, 3] > wh[:, 1] + tol))
    dropped = outside & ((x1 <= x0) | (y1 <= y0))
    clipped = np.stack([x0, y0, np.maximum(x1 - x0, 0), np.maximum(y1 - y0, 0)], 1)
    boxes = np.round(np.where(known[:, None], clipped, b), 3).tolist()
    areas = (clipped[:, 2] * clipped[:, 3]).tolist()
    kept = []
    for k, ann in enumerate(anns):
        if dropped[k]:
            continue
        ann["bbox"] = boxes[k]
        if outside[k]:
            ann["area"] = areas[k]
        kept.append(ann)
    coco["annotations"] = kept
    count = int(outside.sum())
    return count, int(dropped.sum()), where(int(np.argmax(outside))) if count else None
