"""COCO files as annotation tools export them (Roboflow, CVAT, Label Studio), made into plain COCO instances.

What differs from a COCO release, and is undone here:
- Roboflow lists a placeholder category first (id 0, named after the dataset, used by no annotation, the
  supercategory of every real class): it is no class, and is dropped.
- Image file names are relative to the export's image folder, to the export's root (Label Studio:
  `images/x.jpg`), or paths on the annotating machine: each is looked up under the export's folders, by its
  path and then by its base name, and written relative to the folder the dataset reads from.
- Images may lack `width` and `height` (read from the image's header then), annotations `area` or `iscrowd`.

Categories no annotation uses stay classes (a tool lists the classes its project defines); images without
annotations stay background images.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from PIL import Image

from distill.data.coco import CocoFormatError


def read_export(ann_file: Path) -> dict:
    try:
        coco = json.loads(ann_file.read_text())
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{ann_file}: not valid JSON: {e}") from None
    if not isinstance(coco, dict) or any(not isinstance(coco.get(k), list) for k in ("images", "annotations",
                                                                                      "categories")):
        raise CocoFormatError(f"{ann_file}: expected COCO instances with 'images', 'annotations' and 'categories' "
                              "lists")
    return coco


def roboflow_placeholder(coco: dict):
    """The id of Roboflow's placeholder category, or None: the lowest id, used by no annotation, and the
    supercategory of every other category (or itself of supercategory `none`)."""
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    if len(categories) < 2:
        return None
    first, rest = categories[0], categories[1:]
    if any(a.get("category_id") == first["id"] for a in coco["annotations"]):
        return None
    if all(c.get("supercategory") == first.get("name") for c in rest) or first.get("supercategory") == "none":
        return first["id"]
    return None


def normalise_export(coco: dict, ann_file: Path, image_dir: Path, search: Sequence[Path],
                     drop_category=None) -> tuple[dict, list[str]]:
    """Plain COCO instances whose file names resolve under `image_dir`, and the file names not found (kept:
    the dataset skips and reports them when drawn). `search`: the folders file names may be relative to."""
    categories = [{"id": c["id"], "name": str(c.get("name", c["id"]))} for c in coco["categories"]
                  if c["id"] != drop_category]
    known = {c["id"] for c in categories}
    images, missing = [], []
    for im in coco["images"]:
        path = find_image(str(im.get("file_name", "")), search)
        if path is None:
            missing.append(str(im.get("file_name")))
            path = Path(search[0]) / str(im.get("file_name", ""))
        width, height = im.get("width"), im.get("height")
        if not width or not height:
            width, height = header_size(path)
        images.append({"id": im["id"], "file_name": relative_to(path, image_dir), "width": width, "height": height})
    image_ids = {im["id"] for im in images}
    annotations = []
    for k, ann in enumerate(coco["annotations"]):
        where = f"{ann_file}: annotation {ann.get('id', k)}"
        if ann.get("category_id") not in known:
            raise CocoFormatError(f"{where}: category_id {ann.get('category_id')} is not a category "
                                  f"(ids: {sorted(known)})")
        if ann.get("image_id") not in image_ids:
            raise CocoFormatError(f"{where}: image_id {ann.get('image_id')} is not in 'images'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise CocoFormatError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
        annotations.append({"id": ann.get("id", k + 1), "image_id": ann["image_id"],
                            "category_id": ann["category_id"], "bbox": [float(v) for v in bbox],
                            "area": float(ann.get("area") or bbox[2] * bbox[3]), "iscrowd": int(ann.get("iscrowd", 0))})
    return {"images": images, "annotations": annotations, "categories": categories}, missing


def find_image(file_name: str, search: Sequence[Path]):
    name = file_name.replace("\\", "/")
    for base in search:
        for candidate in (Path(base) / name.lstrip("/"), Path(base) / os.path.basename(name)):
            if candidate.is_file():
                return candidate
    return None


def relative_to(path: Path, folder: Path) -> str:
    """`path` relative to `folder` where it lies under it, else absolute (`folder / absolute` is the path)."""
    try:
        return Path(path).relative_to(folder).as_posix()
    except ValueError:
        return str(Path(path).absolute())


def header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image's header; (0, 0) where it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:
        return 0, 0
