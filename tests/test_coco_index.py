"""CocoDetection's flat annotation storage: the same targets as per-image dicts, no Python object per image
(forked loader workers would copy those as they read them), the same errors, and the streaming JSON decoder
agreeing with `json.loads`."""
from __future__ import annotations

import gc
import json
import types
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from distill.data.coco import CocoDetection, CocoFormatError
from distill.data.json_stream import stream_object

CATEGORIES = [{"id": 90, "name": "c"}, {"id": 3, "name": "a"}, {"id": 17, "name": "b"}]  # gaps, out of order


def instances(num_images: int, seed: int = 0) -> dict:
    """Images listed out of id order, some without boxes; annotations shuffled across images, some crowd,
    some reaching past the image or degenerate."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1, num_images + 1) * 7).tolist()
    images = [{"id": i, "file_name": f"dir/img_{i}.jpg", "width": 100 + i % 5, "height": 80} for i in ids]
    anns = []
    for image_id in ids[: num_images - max(1, num_images // 4)]:  # the last quarter has no box
        for _ in range(int(rng.integers(1, 5))):
            x, y = rng.uniform(-10, 100, 2).round(1).tolist()
            w, h = rng.uniform(0.5, 60, 2).round(1).tolist()
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(rng.choice([3, 17, 90])),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.2)})
    order = rng.permutation(len(anns))
    return {"images": images, "annotations": [anns[k] for k in order], "categories": CATEGORIES}


def per_image_reference(coco: dict) -> list[tuple[dict, np.ndarray, np.ndarray]]:
    """(record, boxes, labels) per image in id order, kept as per-image dicts and arrays."""
    label_of = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    boxes, labels = defaultdict(list), defaultdict(list)
    for ann in coco["annotations"]:
        if not ann["iscrowd"]:
            boxes[ann["image_id"]].append(ann["bbox"])
            labels[ann["image_id"]].append(label_of[ann["category_id"]])
    return [(im, np.asarray(boxes[im["id"]], np.float32).reshape(-1, 4), np.asarray(labels[im["id"]], np.int64))
            for im in sorted(coco["images"], key=lambda im: im["id"])]


def clipped(boxes: np.ndarray, labels: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    x0, y0 = boxes[:, 0].clip(0, width), boxes[:, 1].clip(0, height)
    x1, y1 = (boxes[:, 0] + boxes[:, 2]).clip(0, width), (boxes[:, 1] + boxes[:, 3]).clip(0, height)
    keep = (x1 - x0 >= 1) & (y1 - y0 >= 1)
    return np.stack([x0, y0, x1 - x0, y1 - y0], 1)[keep], labels[keep]


def write(tmp_path: Path, coco: dict, key_order=("images", "annotations", "categories"), indent=None) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"info": {"year": 2024}, **{k: coco[k] for k in key_order}}, indent=indent))
    return path


@pytest.mark.parametrize("key_order,indent", [(("images", "annotations", "categories"), None),
                                              (("categories", "annotations", "images"), 2)])
def test_flat_storage_gives_the_per_image_targets(tmp_path, key_order, indent):
    coco = instances(40)
    ds = CocoDetection(tmp_path / "images", write(tmp_path, coco, key_order, indent))
    reference = per_image_reference(coco)
    assert len(ds) == len(reference) and ds.category_ids == [3, 17, 90]
    assert any(len(b) == 0 for _, b, _ in reference) and any(a["iscrowd"] for a in coco["annotations"])
    for i, (record, boxes, labels) in enumerate(reference):
        assert ds.images[i] == record and ds.image_path(i) == tmp_path / "images" / record["file_name"]
        got_boxes, got_labels = ds.annotations(i, record["width"], record["height"])
        want_boxes, want_labels = clipped(boxes, labels, record["width"], record["height"])
        assert got_boxes.dtype == want_boxes.dtype and np.array_equal(got_boxes, want_boxes)
        assert got_labels.dtype == np.int64 and np.array_equal(got_labels, want_labels)
    assert [im["id"] for im in ds.images] == sorted(im["id"] for im in coco["images"])


def owned_objects(root) -> int:
    """Python objects reachable from `root` through containers and instances (classes, modules and functions
    are shared code, not data)."""
    seen, todo = set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(obj))
        todo.extend(gc.get_referents(obj))
    return len(seen)


def test_no_python_object_per_image(tmp_path):
    """What a forked worker copies as it reads: the dataset holds as many Python objects for 300 images as for
    10, its annotations being numpy arrays."""
    for name in ("small", "large"):
        (tmp_path / name).mkdir()
    small = CocoDetection(tmp_path / "small" / "images", write(tmp_path / "small", instances(10)))
    large = CocoDetection(tmp_path / "large" / "images", write(tmp_path / "large", instances(300)))
    assert len(large) == 30 * len(small)
    assert owned_objects(large) == owned_objects(small)
    assert all(isinstance(v, np.ndarray) for v in vars(large.images).values())


def test_the_first_bad_annotation_in_file_order_is_named(tmp_path):
    coco = instances(6)
    coco["annotations"][1]["image_id"] = 5  # not an image id (they are multiples of 7)
    coco["annotations"][2]["category_id"] = 4  # categories come last: known only after both are read
    path = write(tmp_path, coco)
    bad = coco["annotations"][1]["id"]
    with pytest.raises(CocoFormatError, match=rf"instances.json: annotation {bad}: image_id 5 is not in 'images'"):
        CocoDetection(tmp_path / "images", path)
    coco["annotations"][1]["image_id"] = coco["images"][0]["id"]
    coco["annotations"][0]["bbox"] = [1, 2, 3]
    bad = coco["annotations"][0]["id"]
    with pytest.raises(CocoFormatError, match=rf"annotation {bad}: bbox must be \[x, y, width, height\], got \[1"):
        CocoDetection(tmp_path / "images", write(tmp_path, coco))
    coco["annotations"][0]["bbox"] = [1, 2, 3, "wide"]
    with pytest.raises(CocoFormatError, match=rf"annotation {bad}: bbox must hold four numbers"):
        CocoDetection(tmp_path / "images", write(tmp_path, coco))
    coco["images"][2]["file_name"] = None
    with pytest.raises(CocoFormatError, match=r"instances.json: image 2 of 'images' \(id \d+\): file_name"):
        CocoDetection(tmp_path / "images", write(tmp_path, coco))


def test_ids_written_as_whole_floats_match_as_before(tmp_path):
    coco = instances(5)
    ann = next(a for a in coco["annotations"] if not a["iscrowd"])
    reference = per_image_reference(coco)
    ann["category_id"], ann["image_id"] = float(ann["category_id"]), float(ann["image_id"])
    ds = CocoDetection(tmp_path / "images", write(tmp_path, coco))
    for i, (record, boxes, labels) in enumerate(reference):
        assert np.array_equal(ds.annotations(i, 10**4, 10**4)[1], clipped(boxes, labels, 10**4, 10**4)[1])


DOCUMENTS = ['{"a": [1, {"b": [2]}], "images": [{"x": 1}, [2, 3], "s", null] , "n": 1.5e3}',
             ' {\n "images" :[ ] ,"annotations":\t[1,2\n,3 ]\n}\n', '{}', '{"images": {"not": "a list"}}',
             '[1, 2]', '"text"']
INVALID = ['{"images": [1, 2,, 3]}', '{"images": [1 2]}', '{"images": [1, ]}', '{"a": 1} x', '{"a" 1}',
           '{"a": 1,}', '{"images": [{"a": 1}]', '{"images": [{"a": 1}], "annotations": [', '', '{"a": 1 "b": 2}',
           '{"images": [{"a": tru}]}']


@pytest.mark.parametrize("text", DOCUMENTS)
def test_streaming_decode_agrees_with_json_loads(text):
    seen = defaultdict(list)
    got = stream_object(text, {k: seen[k].append for k in ("images", "annotations")})
    want = json.loads(text)
    if isinstance(want, dict):
        for key, value in want.items():
            if isinstance(value, list) and key in ("images", "annotations"):
                assert seen[key] == value and got[key] == len(value)
                want[key] = got[key]
    assert got == want


@pytest.mark.parametrize("text", INVALID)
def test_streaming_decode_fails_as_json_loads_does(text):
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        stream_object(text, {"images": lambda _: None, "annotations": lambda _: None})
    assert str(got.value) == str(want.value)
