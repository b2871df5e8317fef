"""The images and boxes of one COCO instances file as a few flat numpy arrays.

Data loader workers are forked, and a worker that merely reads a Python object writes its reference count
(and the garbage collector writes the headers of the containers it scans), so the page holding the object
is copied into the worker. Per-image dicts, lists and small arrays are therefore copied into every worker as
training touches them: gigabytes per worker for Objects365's 1.7 M images and 25 M boxes. Here the whole
file is held in a handful of large arrays (all boxes, their labels, each image's slice of them, the image ids
and sizes, the file names as one UTF-8 buffer), which workers read in place, and the annotation and image
lists are decoded one element at a time (`distill.data.json_stream`), never held as Python objects.
"""
from __future__ import annotations

from array import array
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from distill.data.json_stream import stream_object


class InvalidAnnotation(Exception):
    """Annotation `position` (0-based, file order) is the first that cannot be kept; `check_annotation` says why."""

    def __init__(self, position: int):
        super().__init__(position)
        self.position = position


class _Found(Exception):
    """Stops a second pass over the annotations at the one it looks for."""

    def __init__(self, value: Any):
        self.value = value


def _as_int(value: Any) -> int:
    """`value` as the integer it equals (an id written 3.0 matches the id 3, as in a dict); TypeError if none."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    raise TypeError(value)


class _Images:
    """Collects the image records as they are decoded."""

    def __init__(self, error: Callable[[str], Exception]):
        self.error = error
        self.ids, self.widths, self.heights, self.names = array("q"), array("q"), array("q"), []

    def __call__(self, record: Any) -> None:
        where = f"image {len(self.names)} of 'images'"
        if not isinstance(record, dict):
            raise self.error(f"{where} is not an object: {record!r}")
        try:
            self.ids.append(_as_int(record.get("id")))
        except (TypeError, OverflowError):
            raise self.error(f"{where}: id must be an integer, got {record.get('id')!r}") from None
        name = record.get("file_name")
        if not isinstance(name, str):
            raise self.error(f"{where} (id {record['id']}): file_name must be a string, got {name!r}")
        self.names.append(name)
        for sizes, key in ((self.widths, "width"), (self.heights, "height")):
            value = record.get(key, -1)
            sizes.append(value if type(value) is int else -1)  # -1: not given (only reported back)


class _Annotations:
    """Collects category ids, image ids, boxes and crowd flags as the annotations are decoded. One whose
    fields do not convert is marked (`ok` 0) and explained after the pass, in file order with the others."""

    def __init__(self):
        self.categories, self.images = array("q"), array("q")
        self.boxes, self.crowd, self.ok = array("f"), array("b"), array("b")

    def __call__(self, ann: Any) -> None:
        try:  # the common case first: this runs once per box
            category, image, bbox = ann["category_id"], ann["image_id"], ann["bbox"]
            if type(category) is not int or type(image) is not int or type(bbox) is not list or len(bbox) != 4:
                raise TypeError
            self.boxes.extend(bbox)
        except (KeyError, TypeError, ValueError, OverflowError):
            del self.boxes[4 * len(self.ok):]  # what a failed extend left
            category, image, bbox = self._convert(ann)
            if bbox is None:
                self.ok.append(0)
                self.boxes.extend((0.0, 0.0, 0.0, 0.0))
                self.crowd.append(0)
                self.categories.append(0)
                self.images.append(0)
                return
            self.boxes.extend(bbox)
        self.ok.append(1)
        self.crowd.append(1 if ann.get("iscrowd", 0) else 0)
        self.categories.append(category)
        self.images.append(image)

    @staticmethod
    def _convert(ann: Any) -> tuple[int, int, Any]:
        """(category id, image id, bbox as four floats) of an annotation off the common path; bbox None: the
        annotation cannot be kept."""
        try:
            bbox = ann.get("bbox")
            if type(bbox) is not list or len(bbox) != 4:
                raise TypeError(bbox)
            return _as_int(ann.get("category_id")), _as_int(ann.get("image_id")), array("f", bbox)
        except (AttributeError, TypeError, ValueError, OverflowError):
            return 0, 0, None


def read_instances(text: str, error: Callable[[str], Exception]) -> tuple[Any, "_Images", "_Annotations"]:
    """Decode an instances file: (its top level with 'images' and 'annotations' left out, images, annotations).
    Raises `json.JSONDecodeError` for invalid JSON and `error(message)` for an image record it cannot keep."""
    images, annotations = _Images(error), _Annotations()
    return stream_object(text, {"images": images, "annotations": annotations}), images, annotations


def _positions(sorted_values: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position of each value in `sorted_values`, whether it is there)."""
    pos = np.searchsorted(sorted_values, values)
    found = pos < len(sorted_values)
    found[found] = sorted_values[pos[found]] == values[found]
    return pos, found


def label_positions(category_ids: Sequence[int], values: np.ndarray) -> np.ndarray:
    """The label (position in `category_ids`) of each category id in `values`; -1 where it is not one."""
    ids = np.asarray(category_ids, np.int64)
    sorter = np.argsort(ids, kind="stable")
    pos, found = _positions(ids[sorter], values)
    return np.where(found, sorter[np.minimum(pos, len(ids) - 1)] if len(ids) else -1, -1)


class CocoIndex:
    """Every image of an instances file in id order and the boxes of its non-crowd annotations (file order),
    as numpy arrays only. `index[i]` is image i's record ({"id", "file_name"[, "width", "height"]});
    `annotations(i)` its xywh pixel boxes and labels. `InvalidAnnotation` names the first annotation with a
    field that does not convert, an unknown category or an unknown image."""

    def __init__(self, images: _Images, annotations: _Annotations, category_ids: Sequence[int]):
        order = np.argsort(np.frombuffer(images.ids, np.int64), kind="stable")  # sorted by id, ties as listed
        self.image_ids = np.frombuffer(images.ids, np.int64)[order]
        self.widths = np.frombuffer(images.widths, np.int64)[order]
        self.heights = np.frombuffer(images.heights, np.int64)[order]
        encoded = [images.names[i].encode() for i in order]
        self.name_offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(n) for n in encoded], out=self.name_offsets[1:])
        self.names = np.frombuffer(b"".join(encoded), np.uint8)

        labels = label_positions(category_ids, np.frombuffer(annotations.categories, np.int64))
        image_of = np.frombuffer(annotations.images, np.int64)
        ok = (np.frombuffer(annotations.ok, np.int8) == 1) & (labels >= 0) & _positions(self.image_ids, image_of)[1]
        if not ok.all():
            raise InvalidAnnotation(int(np.argmin(ok)))
        keep = np.frombuffer(annotations.crowd, np.int8) == 0  # crowd regions are ignored by the evaluation
        by_image = np.argsort(image_of[keep], kind="stable")  # an image's boxes stay in file order
        image_of = image_of[keep][by_image]
        self.boxes = np.frombuffer(annotations.boxes, np.float32).reshape(-1, 4)[keep][by_image]
        self.labels = labels[keep][by_image].astype(np.int32)
        # starts/stops rather than offsets: two records with one id (kept, as listed) share the same boxes
        self.starts = np.searchsorted(image_of, self.image_ids, "left")
        self.stops = np.searchsorted(image_of, self.image_ids, "right")

    def __len__(self) -> int:
        return len(self.image_ids)

    def file_name(self, i: int) -> str:
        return self.names[self.name_offsets[i]:self.name_offsets[i + 1]].tobytes().decode()

    def image_id(self, i: int) -> int:
        return int(self.image_ids[i])

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} of {len(self)}")
        i %= len(self)
        record = {"id": self.image_id(i), "file_name": self.file_name(i)}
        if self.widths[i] >= 0 and self.heights[i] >= 0:
            record.update(width=int(self.widths[i]), height=int(self.heights[i]))
        return record

    def annotations(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of image i's boxes (float32 xywh pixels, (n, 4)) and labels (int32, (n,))."""
        return self.boxes[self.starts[i]:self.stops[i]], self.labels[self.starts[i]:self.stops[i]]


def nth_annotation(text: str, n: int) -> Any:
    """The n-th element of the instances file's annotation list, decoded again (to explain an error)."""
    seen = []

    def look(ann: Any) -> None:
        if len(seen) == n:
            raise _Found(ann)
        seen.append(None)

    try:
        stream_object(text, {"annotations": look})
    except _Found as found:
        return found.value
    raise IndexError(n)


def check_annotation(ann: Any, ann_file: Path, label_of: dict, category_ids: Sequence[int], known_images,
                     error: Callable[[str], Exception]) -> None:
    """Raise `error` saying what is wrong with one annotation (category, then image, then box)."""
    if not isinstance(ann, dict):
        raise error(f"{ann_file}: annotation {ann!r} is not an object")
    where = f"{ann_file}: annotation {ann.get('id', '?')}"
    if ann.get("category_id") not in label_of:
        raise error(f"{where}: category_id {ann.get('category_id')} is not a known category (ids: {category_ids})")
    if ann.get("image_id") not in known_images:
        raise error(f"{where}: image_id {ann.get('image_id')} is not in 'images'")
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4):
        raise error(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
    raise error(f"{where}: bbox must hold four numbers, got {bbox!r}")
