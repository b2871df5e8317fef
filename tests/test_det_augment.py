"""RT-DETR training augmentation against the reference's definitions (RT-DETRv2's `dataloader.yml`, built here
from torchvision's own transforms): box sizes, aspect changes and kept boxes have the reference's
distributions, over a few hundred generated images with boxes of known identity."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2 as T

from distill.data.coco import CocoDetection, SampleRequest

SIDE, NUM_IMAGES, MAX_BOXES = 320, 300, 8


def reference_pipeline(size):
    """RT-DETRv2's training transforms, as its configuration lists them, from torchvision."""
    return T.Compose([
        T.RandomPhotometricDistort(p=0.5),
        T.RandomZoomOut(fill=0),
        T.RandomApply([T.RandomIoUCrop()], p=0.8),  # the reference's RandomIoUCrop(p=0.8)
        T.SanitizeBoundingBoxes(min_size=1),
        T.RandomHorizontalFlip(),
        T.Resize((size, size)),
        T.SanitizeBoundingBoxes(min_size=1),
    ])


@pytest.fixture(scope="module")
def boxes_world(tmp_path_factory):
    """4:3 images with 1-8 boxes of spread sizes and aspects; box k of an image has category k, so each
    box can be followed through the transforms."""
    root = tmp_path_factory.mktemp("aug")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(NUM_IMAGES):
        w, h = 160, 120
        Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 255, 3))).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        for k in range(int(rng.integers(1, MAX_BOXES + 1))):
            side = float(np.exp(rng.uniform(np.log(6), np.log(100))))
            aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2))))
            bw, bh = min(side * aspect ** 0.5, w - 1), min(side / aspect ** 0.5, h - 1)
            x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": k + 1,
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
    categories = [{"id": k + 1, "name": f"box{k}"} for k in range(MAX_BOXES)]
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return CocoDetection(root / "images", ann, train=True, img_size=SIDE)


def box_statistics(samples):
    """Per kept box: side (sqrt of area, share of the output side) and |log| aspect change; and the share kept."""
    sides, aspect_changes, kept, total = [], [], 0, 0
    for (in_boxes, in_labels), (out_boxes, out_labels) in samples:
        total += len(in_labels)
        kept += len(out_labels)
        before = {int(label): box for box, label in zip(in_boxes, in_labels)}
        for (cx, cy, w, h), label in zip(out_boxes.tolist(), out_labels.tolist()):
            sides.append((w * h) ** 0.5)
            bw, bh = before[int(label)][2:].tolist()
            aspect_changes.append(abs(np.log((w / h) / (bw / bh))))
    return np.array(sides), np.array(aspect_changes), kept / total


def ours(dataset):
    samples = []
    for i in range(len(dataset)):
        boxes, labels = dataset.annotations(i, 160, 120)
        target = dataset[SampleRequest(i, SIDE, True, seed=1000 + i)]["target"]
        assert target["boxes"].dtype == torch.float32 and ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
        samples.append(((torch.as_tensor(boxes), torch.as_tensor(labels)), (target["boxes"], target["labels"])))
    return samples


def reference(dataset):
    pipeline = reference_pipeline(SIDE)
    samples = []
    for i in range(len(dataset)):
        image = torch.from_numpy(dataset.read_image(i)).permute(2, 0, 1)
        boxes, labels = dataset.annotations(i, 160, 120)
        sample = {"image": tv_tensors.Image(image), "labels": torch.as_tensor(labels),
                  "boxes": tv_tensors.BoundingBoxes(box_convert(torch.as_tensor(boxes), "xywh", "xyxy"),
                                                    format="XYXY", canvas_size=(120, 160))}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5000 + i)
            out = pipeline(sample)
        cxcywh = box_convert(out["boxes"].as_subclass(torch.Tensor), "xyxy", "cxcywh") / SIDE
        samples.append(((torch.as_tensor(boxes), torch.as_tensor(labels)), (cxcywh, out["labels"])))
    return samples


def test_box_distributions_follow_the_reference_augmentation(boxes_world):
    sides, aspects, kept = box_statistics(ours(boxes_world))
    ref_sides, ref_aspects, ref_kept = box_statistics(reference(boxes_world))

    # the reference crops (IoU crop) and so drops and cuts boxes; a crop that keeps them all does not
    assert ref_kept == pytest.approx(kept, abs=0.04) and kept < 0.95
    # zoom-out and IoU crop move box sizes both ways (down to 1/4, up to 1/0.3): the quantiles agree
    for q in (0.1, 0.5, 0.9):
        assert np.quantile(sides, q) == pytest.approx(np.quantile(ref_sides, q), abs=0.015), q
    # the zoom-out keeps the aspect ratio and the crop's aspect is bounded: few boxes change shape a lot
    for factor in (1.5, 2.0):
        share, ref_share = (np.mean(a > np.log(factor)) for a in (aspects, ref_aspects))
        assert share == pytest.approx(ref_share, abs=0.03), factor


def test_seeded_samples_repeat_and_leave_the_caller_random_state_alone(boxes_world):
    request = SampleRequest(3, SIDE, True, seed=42)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, b = boxes_world[request], boxes_world[request]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"]["boxes"], b["target"]["boxes"])
    assert a["image"].dtype == torch.uint8 and a["image"].shape == (3, SIDE, SIDE)


def test_an_image_without_boxes_goes_through_every_transform(tmp_path):
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "empty.png")
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "empty.png", "width": 64, "height": 48}], "annotations": [],
        "categories": [{"id": 1, "name": "thing"}]}))
    dataset = CocoDetection(tmp_path, tmp_path / "ann.json", train=True, img_size=64)
    for seed in range(20):
        out = dataset[SampleRequest(0, 64, True, seed=seed)]
        assert out["image"].shape == (3, 64, 64) and out["target"]["boxes"].shape == (0, 4)
