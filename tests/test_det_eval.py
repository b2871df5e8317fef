"""COCO-format detection data and box AP: the loader's id and box conversions, corrupt files, the batch
sampler, and the metric on prediction sets whose AP is known by construction."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data.coco import (
    CocoDetection,
    CocoFormatError,
    DetectionBatchSampler,
    SampleRequest,
    build_eval_loader,
    build_train_loader,
    collate_detection,
    to_model_input,
)
from distill.detection.evaluate import coco_box_metrics, to_coco_results

# Category ids with gaps and out of order, as in COCO itself (1..90 with holes).
CATEGORIES = [{"id": 90, "name": "c"}, {"id": 3, "name": "a"}, {"id": 17, "name": "b"}]
BOXES = {  # image id → [(category id, [x, y, w, h])]
    5: [(3, [10.0, 20.0, 30.0, 40.0]), (90, [60.0, 5.0, 50.0, 25.5])],
    9: [(17, [0.0, 0.0, 120.0, 80.0])],
    12: [(90, [33.0, 44.0, 12.0, 8.0]), (17, [70.0, 10.0, 40.0, 60.0]), (3, [5.0, 50.0, 20.0, 20.0])],
}
SIZE = (120, 80)  # (w, h): not square, so a mix-up of x and y shows


def write_coco(root: Path, crowd: bool = False) -> tuple[Path, Path]:
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for image_id, objects in BOXES.items():
        name = f"img_{image_id}.png"
        Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "width": SIZE[0], "height": SIZE[1]})
        for cat, bbox in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": 0})
    if crowd:
        anns.append({"id": 99, "image_id": 9, "category_id": 3, "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0,
                     "iscrowd": 1})
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return images_dir, ann_file


def cxcywh_to_xywh(boxes: torch.Tensor, w: float, h: float) -> torch.Tensor:
    boxes = boxes * torch.tensor([w, h, w, h])
    return torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, 2:]], 1)


# ---- the loader ------------------------------------------------------------------------------------


def test_category_ids_and_boxes_round_trip(tmp_path):
    images_dir, ann_file = write_coco(tmp_path, crowd=True)
    ds = CocoDetection(images_dir, ann_file, train=False, img_size=64)
    assert ds.category_ids == [3, 17, 90] and ds.class_names == ["a", "b", "c"] and ds.num_classes == 3
    seen = {}
    for i in range(len(ds)):
        sample = ds[i]
        t = sample["target"]
        assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.uint8
        assert t["orig_size"].tolist() == list(SIZE)
        assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
        # normalised boxes survive the (non-uniform) resize; back in pixels of the original image
        xywh = cxcywh_to_xywh(t["boxes"], *SIZE)
        cats = [ds.category_ids[label] for label in t["labels"].tolist()]
        seen[t["image_id"]] = sorted(zip(cats, [[round(v, 2) for v in b] for b in xywh.tolist()]))
    expected = {k: sorted((c, [round(v, 2) for v in b]) for c, b in v) for k, v in BOXES.items()}
    assert seen == expected  # the crowd box of image 9 is not a training target


def test_training_augmentation_keeps_boxes_valid(tmp_path):
    images_dir, ann_file = write_coco(tmp_path)
    ds = CocoDetection(images_dir, ann_file, train=True, img_size=64)
    for seed in range(20):
        t = ds[SampleRequest(2, 96, True, seed)]["target"]
        b = t["boxes"]
        assert ((b[:, :2] - b[:, 2:] / 2 >= -1e-5) & (b[:, :2] + b[:, 2:] / 2 <= 1 + 1e-5)).all()
        assert (b[:, 2:] > 0).all() and len(t["labels"]) == len(b) and set(t["labels"].tolist()) <= {0, 1, 2}
    # the request's seed fixes the augmentation: the same request gives the same sample
    a, b = ds[SampleRequest(0, 64, True, 7)], ds[SampleRequest(0, 64, True, 7)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"]["boxes"], b["target"]["boxes"])


def test_corrupt_images_are_skipped_and_named(tmp_path):
    images_dir, ann_file = write_coco(tmp_path)
    (images_dir / "img_9.png").write_bytes(b"not an image at all")
    (images_dir / "img_12.png").write_bytes((images_dir / "img_5.png").read_bytes()[:60])  # truncated
    val = CocoDetection(images_dir, ann_file, train=False, img_size=64)
    batches = list(build_eval_loader(val, batch_size=3, num_workers=0))
    assert sum(len(b["targets"]) for b in batches) == 1
    assert sorted(n for b in batches for n in b["skipped"]) == ["img_12.png", "img_9.png"]

    train = CocoDetection(images_dir, ann_file, train=True, img_size=64)
    sampler = DetectionBatchSampler(len(train), 3, [64], total_batches=2, seed=0, strong_until=0)
    batches = list(build_train_loader(train, sampler, num_workers=0))
    # a skipped image is replaced, so the batch keeps its size
    assert all(b["images"].shape == (3, 3, 64, 64) for b in batches)
    assert all(t["image_id"] == 5 for b in batches for t in b["targets"])
    assert sorted(set(n for b in batches for n in b["skipped"])) == ["img_12.png", "img_9.png"]


def test_bad_annotations_name_the_file_and_annotation(tmp_path):
    images_dir, ann_file = write_coco(tmp_path)
    coco = json.loads(ann_file.read_text())
    coco["annotations"][1]["category_id"] = 4
    ann_file.write_text(json.dumps(coco))
    with pytest.raises(CocoFormatError, match=r"instances.json: annotation 2: category_id 4"):
        CocoDetection(images_dir, ann_file)
    ann_file.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(CocoFormatError, match="categories"):
        CocoDetection(images_dir, ann_file)


def test_batch_sampler_shards_resumes_and_switches_augmentation():
    kwargs = dict(num_images=50, batch_size=4, sizes=[64, 96, 128], total_batches=20, seed=3, strong_until=15)
    whole = list(DetectionBatchSampler(**kwargs))
    assert len(whole) == 20 and all(len(b) == 4 for b in whole)
    # one epoch = 12 batches of 4 out of 50 images, no image twice within it
    first_epoch = [r.index for b in whole[:12] for r in b]
    assert len(set(first_epoch)) == 48
    assert [b[0].strong for b in whole] == [True] * 15 + [False] * 5
    assert len({b[0].size for b in whole[:15]}) > 1 and all(len({r.size for r in b}) == 1 for b in whole)
    assert {b[0].size for b in whole[15:]} == {128}  # multi-scale stops with the strong augmentations
    # resuming at batch 7 draws exactly the remaining batches
    assert list(DetectionBatchSampler(**kwargs, start_batch=7)) == whole[7:]
    # two processes split each global batch of 8 between them (each draws its own side for its half)
    halves = [list(DetectionBatchSampler(**{**kwargs, "total_batches": 6}, rank=r, world_size=2)) for r in (0, 1)]
    for b0, b1 in zip(*halves):
        assert not {r.index for r in b0} & {r.index for r in b1}
    with pytest.raises(ValueError, match="multiples of 32"):
        DetectionBatchSampler(**{**kwargs, "sizes": [100]})


def test_normalisation_on_the_device_matches_per_pixel_formula():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = to_model_input(images, mean, std)
    ref = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-5)


def test_collate_keeps_targets_and_drops_missing_images():
    item = {"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "target": {"image_id": 1}, "skipped": []}
    batch = collate_detection([item, {"image": None, "target": None, "skipped": ["x.jpg"]}, item])
    assert batch["images"].shape == (2, 3, 4, 4) and len(batch["targets"]) == 2 and batch["skipped"] == ["x.jpg"]


# ---- the metric ------------------------------------------------------------------------------------


def ground_truth_predictions(ds: CocoDetection):
    """Post-processor-style results equal to the ground truth (abs xyxy boxes, contiguous labels)."""
    results, ids = [], []
    for i in range(len(ds)):
        t = ds[i]["target"]
        xywh = cxcywh_to_xywh(t["boxes"], *t["orig_size"].tolist())
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        results.append({"boxes": xyxy, "labels": t["labels"], "scores": torch.linspace(0.9, 0.8, len(xyxy))})
        ids.append(t["image_id"])
    return results, ids


@pytest.fixture
def coco_set(tmp_path):
    images_dir, ann_file = write_coco(tmp_path)
    return CocoDetection(images_dir, ann_file, train=False, img_size=64), ann_file


def test_perfect_predictions_score_one(coco_set):
    ds, ann_file = coco_set
    dets = to_coco_results(*ground_truth_predictions(ds), ds.category_ids)
    assert {d["category_id"] for d in dets} == {3, 17, 90}
    m = coco_box_metrics(ann_file, dets)
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AR100"] == pytest.approx(1.0)


def test_shifted_boxes_match_only_at_low_iou(coco_set):
    ds, ann_file = coco_set
    dets = to_coco_results(*ground_truth_predictions(ds), ds.category_ids)
    # a shift by 30% of the width leaves IoU = 0.7 / 1.3 = 0.54: a hit at IoU 0.50 only, of ten thresholds
    shifted = [dict(d, bbox=[d["bbox"][0] + 0.3 * d["bbox"][2], *d["bbox"][1:]]) for d in dets]
    m = coco_box_metrics(ann_file, shifted)
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(0.0) and m["AP"] == pytest.approx(0.1)


def test_wrong_classes_missing_objects_and_extra_boxes(coco_set):
    ds, ann_file = coco_set
    dets = to_coco_results(*ground_truth_predictions(ds), ds.category_ids)
    wrong = [dict(d, category_id={3: 17, 17: 90, 90: 3}[d["category_id"]]) for d in dets]
    assert coco_box_metrics(ann_file, wrong)["AP"] == pytest.approx(0.0)
    # a low-scored false positive below every true positive leaves AP at 1
    extra = dets + [{"image_id": 9, "category_id": 17, "bbox": [90.0, 60.0, 10.0, 10.0], "score": 0.01}]
    assert coco_box_metrics(ann_file, extra)["AP"] == pytest.approx(1.0)
    # dropping image 12's detections loses its category-3 and category-90 objects
    partial = coco_box_metrics(ann_file, [d for d in dets if d["image_id"] != 12])
    assert 0.3 < partial["AP"] < 0.8 and partial["AR100"] < 1.0
    # ... unless the evaluation is told image 12 was never seen (an undecodable file)
    assert coco_box_metrics(ann_file, [d for d in dets if d["image_id"] != 12], [5, 9])["AP"] == pytest.approx(1.0)
    assert coco_box_metrics(ann_file, [])["AP"] == 0.0


# ---- the generated detection set -------------------------------------------------------------------


def test_generated_set_is_valid_coco_with_varied_objects(tmp_path):
    from distill.data.synthetic_coco import generate_coco_shapes

    generate_coco_shapes(tmp_path, num_train=40, num_val=10, img_size=160, num_classes=5, max_objects=6, seed=1)
    coco = json.loads((tmp_path / "train" / "annotations.json").read_text())
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5]
    assert len(coco["images"]) == 40 and all((tmp_path / "train" / "images" / im["file_name"]).exists()
                                             for im in coco["images"])
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]])
    assert per_image.max() > 2  # several objects per image
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3, 4, 5}
    areas = np.array([a["area"] for a in coco["annotations"]])
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any() and (areas >= 96**2).any()
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 160 and y + h <= 160
    ds = CocoDetection(tmp_path / "val" / "images", tmp_path / "val" / "annotations.json")
    assert len(ds) == 10 and ds.images[0]["id"] == 41  # ids do not collide with the train split's


def test_demo_set_is_generated_once(tmp_path):
    from distill.data.synthetic_coco import ensure_det_demo

    root = ensure_det_demo(tmp_path / "det_demo", num_train=4, num_val=2, img_size=64)
    stamp = (root / "train" / "annotations.json").stat().st_mtime_ns
    assert ensure_det_demo(root, num_train=4, num_val=2, img_size=64) == root
    assert (root / "train" / "annotations.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["det_demo"]  # no temporary folder left behind
