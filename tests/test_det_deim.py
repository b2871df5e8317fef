"""DEIM's training as recipe keys: Mosaic and batch MixUp keep boxes on their pixels and are drawn per sample
from the sampler's seeds, the flat-then-cosine LR has DEIM's shape, and unsupported combinations stop at load
with one line. The recipes themselves are checked in tests/test_det_dfine.py."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert

from distill.config import ConfigError
from distill.data.coco import CocoDetection, DetectionBatchSampler, Phase, SampleRequest, collate_detection
from distill.data.det_augment import MosaicSettings, mixup_batch, mosaic_canvas
from distill.detection.recipe import load_det_config
from distill.engine.optim import flat_cosine
from distill.finetune_det import build_scheduler, plan_steps

BRIGHT = 100  # white objects on black stay above it, the background below, whatever the photometric draw


def _rects_image(height, width, rects, value=255):
    """A black (H, W, 3) image with filled rectangles (x, y, w, h) and their xywh boxes."""
    image = np.zeros((height, width, 3), np.uint8)
    for x, y, w, h in rects:
        image[y:y + h, x:x + w] = value
    return image, np.asarray(rects, np.float32).reshape(-1, 4)


@pytest.fixture(scope="module")
def rect_world(tmp_path_factory):
    """Eight PNGs of white rectangles on black (two without any), every rectangle annotated."""
    root = tmp_path_factory.mktemp("deim")
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(8):
        width, height = int(rng.choice([96, 128])), int(rng.choice([80, 96]))
        rects = []
        for _ in range(0 if i in (2, 5) else int(rng.integers(1, 4))):
            w, h = int(rng.integers(20, 40)), int(rng.integers(20, 40))
            rects.append((int(rng.integers(0, width - w)), int(rng.integers(0, height - h)), w, h))
        image, boxes = _rects_image(height, width, rects)
        Image.fromarray(image).save(root / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": width, "height": height})
        annotations += [{"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "bbox": box.tolist(),
                         "area": float(box[2] * box[3]), "iscrowd": 0} for box in boxes]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                               "categories": [{"id": 1, "name": "rect"}]}))
    return CocoDetection(root, root / "ann.json", train=True, img_size=96, mosaic=MosaicSettings(48))


def test_the_mosaic_canvas_puts_each_image_and_its_boxes_in_its_quadrant():
    # shorter sides of 64 scaled to 32: a factor of exactly 0.5, so pixel and box positions are exact
    shapes = [(64, 96), (80, 64), (64, 64), (64, 128)]
    rects = [[(8, 8, 20, 30), (50, 40, 40, 20)], [(0, 0, 64, 16)], [], [(100, 2, 28, 60)]]
    parts = [(*_rects_image(h, w, r, value=40 * (k + 1)), np.full(len(r), k)) for k, ((h, w), r)
             in enumerate(zip(shapes, rects))]
    canvas, boxes, labels = mosaic_canvas(parts, 32)
    cell_h, cell_w = 40, 64  # the largest scaled height (80 / 2) and width (128 / 2)
    assert canvas.shape == (3, 2 * cell_h, 2 * cell_w) and canvas.dtype == torch.uint8
    expected = [[x / 2 + (k % 2) * cell_w, y / 2 + (k // 2) * cell_h, (x + w) / 2 + (k % 2) * cell_w,
                 (y + h) / 2 + (k // 2) * cell_h] for k, r in enumerate(rects) for x, y, w, h in r]
    assert torch.equal(boxes, torch.tensor(expected)) and labels.tolist() == [0, 0, 1, 3]
    outside = torch.ones(canvas.shape[-2:], dtype=torch.bool)
    for (x0, y0, x1, y1), label in zip(boxes.int().tolist(), labels.tolist()):
        # inside each box its image's value (the antialiasing blends one pixel at the edges), around it black
        assert (canvas[:, y0 + 1:y1 - 1, x0 + 1:x1 - 1] == 40 * (label + 1)).all()
        outside[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = False
    assert (canvas[:, outside] == 0).all()


def test_mosaic_boxes_land_on_their_pixels_and_are_cut_to_the_image(rect_world):
    """Through the whole mosaic pipeline (affine, photometric, flip, resize): every bright pixel lies in a
    box, every box is mostly bright, and boxes stay inside the image, cut where the affine moved them out."""
    touching, total = 0, 0
    for seed in range(40):
        partners = tuple(int(j) for j in np.random.default_rng(seed).integers(len(rect_world), size=3))
        out = rect_world[SampleRequest(seed % 8, 96, True, seed, mosaic=partners)]
        image, boxes = out["image"], out["target"]["boxes"]
        assert image.shape == (3, 96, 96) and len(boxes) == len(out["target"]["labels"])
        xyxy = box_convert(boxes, "cxcywh", "xyxy") * 96
        assert ((xyxy >= -1e-4) & (xyxy <= 96 + 1e-4)).all()
        bright = image.float().mean(0) > BRIGHT
        covered = torch.zeros_like(bright)
        for x0, y0, x1, y1 in xyxy.tolist():
            inside = bright[int(y0 + 0.5):int(y1 + 0.5), int(x0 + 0.5):int(x1 + 0.5)]
            # a box encloses its rotated rectangle (up to 10 degrees): mostly object, unless cut to a sliver
            # at the border, where the enclosing box's corner may hold more background than object
            assert inside.float().mean() > (0.5 if min(x1 - x0, y1 - y0) >= 8 else 0), (seed, x0, y0, x1, y1)
            covered[max(0, int(y0) - 2):int(y1) + 3, max(0, int(x0) - 2):int(x1) + 3] = True
            touching += min(x0, y0) < 1e-3 or max(x1, y1) > 96 - 1e-3
            total += 1
        # a box cut to under a pixel is dropped (SanitizeBoundingBoxes), its object a line on the border at most
        covered[[0, -1], :] = True
        covered[:, [0, -1]] = True
        assert not (bright & ~covered).any(), seed
    assert total > 100 and touching > 5  # some boxes were cut at the border


def test_empty_images_go_through_mosaic_and_mixup(rect_world):
    out = rect_world[SampleRequest(2, 64, True, 3, mosaic=(5, 5, 2))]  # the two images without boxes
    assert out["image"].shape == (3, 64, 64)
    assert out["target"]["boxes"].shape == (0, 4) and out["target"]["labels"].shape == (0,)
    full = rect_world[SampleRequest(0, 64, True, 3, mixup=0.5)]
    empty = rect_world[SampleRequest(5, 64, True, 3, mixup=0.5)]
    batch = collate_detection([empty, full])
    assert [len(t["boxes"]) for t in batch["targets"]] == [len(full["target"]["boxes"])] * 2
    alone = collate_detection([{**empty, "mixup": 0.5}])  # one image is not mixed with itself
    assert torch.equal(alone["images"][0], empty["image"]) and len(alone["targets"][0]["boxes"]) == 0


def test_mixup_blends_each_image_with_the_previous_and_keeps_both_targets():
    images = torch.stack([torch.full((3, 4, 4), v, dtype=torch.uint8) for v in (0, 100, 255)])
    targets = [{"boxes": torch.rand(n, 4), "labels": torch.full((n,), n), "image_id": n} for n in (1, 0, 2)]
    mixed, out = mixup_batch(images, targets, 0.45)
    # image i keeps 0.45 of itself, 0.55 of image i-1 (the first takes the last), rounded to uint8
    assert [int(m[0, 0, 0]) for m in mixed] == [round(0.55 * 255), round(0.45 * 100), round(0.45 * 255 + 0.55 * 100)]
    for i, (t, o) in enumerate(zip(targets, out)):
        prev = targets[i - 1]
        assert torch.equal(o["boxes"], torch.cat([t["boxes"], prev["boxes"]]))
        assert o["labels"].tolist() == t["labels"].tolist() + prev["labels"].tolist() and o["image_id"] == t["image_id"]


def test_augmented_samples_repeat_from_their_seed_alone(rect_world):
    request = SampleRequest(1, 96, True, 42, mosaic=(3, 4, 6))
    torch.manual_seed(0)
    state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    a, b = rect_world[request], rect_world[request]
    assert torch.equal(torch.get_rng_state(), state) and np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"]["boxes"], b["target"]["boxes"])
    other = rect_world[request._replace(seed=43)]
    assert not torch.equal(a["image"], other["image"])


SAMPLER = dict(num_images=40, batch_size=4, sizes=[64, 96, 128], total_batches=40, seed=5, strong_until=32)


def test_sampler_draws_mosaic_and_mixup_in_their_epochs_and_resumes_exactly():
    deim = dict(strong_from=4, mosaic=Phase(0.5, 4, 20), mixup=Phase(0.5, 4, 20), mixup_ratio=(0.45, 0.55))
    whole = list(DetectionBatchSampler(**SAMPLER, **deim))
    plain = list(DetectionBatchSampler(**SAMPLER))
    # the images, seeds and sides are those of a plain run; the strong augmentations start at batch 4
    assert [[(r.index, r.seed, r.size) for r in b] for b in whole] == [[(r.index, r.seed, r.size) for r in b]
                                                                        for b in plain]
    assert [b[0].strong for b in whole] == [False] * 4 + [True] * 28 + [False] * 8
    assert len({b[0].size for b in whole[:4]}) > 1  # multi-scale from the start, as DEIM's
    mosaics = [bool(r.mosaic) for b in whole for r in b]
    assert not any(mosaics[:16]) and not any(mosaics[80:]) and 0.3 < np.mean(mosaics[16:80]) < 0.7
    assert all(len(r.mosaic) == 3 and all(0 <= j < 40 for j in r.mosaic) for b in whole for r in b if r.mosaic)
    ratios = [b[0].mixup for b in whole]
    assert all(len({r.mixup for r in b}) == 1 for b in whole)  # one draw per batch
    assert all(m is None for m in ratios[:4] + ratios[20:]) and 4 <= sum(m is not None for m in ratios[4:20]) <= 12
    assert all(0.45 <= m <= 0.55 for m in ratios if m is not None)
    # the defaults draw nothing new: RT-DETRv2's requests exactly
    assert all(r.mosaic == () and r.mixup is None and r.strong == (g < 32) for g, b in enumerate(plain) for r in b)
    # a resumed sampler draws the same remaining batches
    assert list(DetectionBatchSampler(**SAMPLER, **deim, start_batch=13)) == whole[13:]
    # two processes: each sample keeps its seed and mosaic whatever the split of the global batch of 4
    halves = [list(DetectionBatchSampler(**{**SAMPLER, "batch_size": 2}, **deim, rank=r, world_size=2))
              for r in (0, 1)]
    for g, b in enumerate(whole):
        split = sorted((r.index, r.seed, r.mosaic) for half in halves for r in half[g])
        assert split == sorted((r.index, r.seed, r.mosaic) for r in b)


def test_flat_cosine_has_deims_shape_at_known_steps():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param], "lr": 2.0}], lr=2.0)
    scheduler = flat_cosine(optimizer, warmup_steps=10, total_steps=100, flat_steps=40, no_aug_steps=20,
                            min_lr_ratio=0.5)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(2.0 * 0.01) and lrs[4] == pytest.approx(2.0 * 0.25)  # quadratic warm-up
    assert lrs[9:41] == pytest.approx([2.0] * 32)  # flat from the warm-up's end to step 40
    assert lrs[60] == pytest.approx(2.0 * 0.75)  # half-way down the cosine from 40 to 80
    assert lrs[50] == pytest.approx(2.0 * (0.5 + 0.25 * (1 + np.cos(np.pi / 4))))
    assert lrs[80:] == pytest.approx([1.0] * 20)  # min_lr_ratio through the epochs without augmentation
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_the_demo_plan_puts_deims_epochs_on_steps():
    cfg = load_det_config(["recipe=det_demo_deim"])
    plan = plan_steps(cfg, 800, 1)  # 100 steps an epoch at batch 8
    assert (plan.total_steps, plan.warmup, plan.strong_from, plan.strong_until, plan.mosaic, plan.mixup,
            plan.flat_until) == (1200, 50, 50, 1100, (50, 600), (50, 600), 600)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, cfg.optim, plan)
    factors = [scheduler.lr_lambdas[0](k) for k in (0, 49, 300, 600, 850, 1100, 1199)]
    assert factors == pytest.approx([(1 / 50) ** 2, 1, 1, 1, 0.75, 0.5, 0.5])
    # RT-DETRv2 stays the default: nothing of DEIM's is on
    base = load_det_config(["recipe=rtdetr_base"])
    assert (base.data.mosaic_prob, base.data.mixup_prob, base.optim.schedule, base.train.aug_start_epoch) == (
        0, 0, "cosine", 0)
    base_plan = plan_steps(base, 1600, 1)
    assert base_plan.strong_from == 0 and base_plan.flat_until == 0


@pytest.mark.parametrize("overrides, message", [
    (["optim.flat_epochs=null"], r"optim\.schedule=flat_cosine needs optim\.flat_epochs"),
    (["optim.schedule=cosine"], r"optim\.flat_epochs is a flat_cosine setting: set optim\.schedule=flat_cosine"),
    (["optim.flat_epochs=20"], r"optim\.flat_epochs=20 is beyond the end of the cosine, which ends with the strong "
                               r"augmentations at epoch 11 \(train\.epochs=12 - train\.no_aug_epochs=1\)"),
    (["data.mosaic_epochs=[0.5,12]"], r"data\.mosaic_epochs=\[0\.5, 12\] runs past the strong augmentations"),
    (["data.mosaic_epochs=[0,6]"], r"data\.mosaic_epochs=\[0, 6\] starts before the strong augmentations do "
                                   r"\(train\.aug_start_epoch=0\.5\)"),
    (["data.mixup_epochs=[6,2]"], r"data\.mixup_epochs=\[6, 2\] must be \[start, stop\) with start < stop"),
    (["data.mixup_epochs=[1,2,3]"], r"data\.mixup_epochs=\[1, 2, 3\] must be \[start, stop\)"),
    (["data.mixup_ratio=[0.6,0.4]"], r"data\.mixup_ratio=\[0\.6, 0\.4\] must be \[low, high\]"),
    (["data.mosaic_prob=1.5"], r"data\.mosaic_prob=1\.5 must be in \[0\.0, 1\.0\]"),
    (["optim.schedule=step"], r"optim\.schedule='step' is not one of cosine, flat_cosine"),
    (["train.aug_start_epoch=11"], r"train\.aug_start_epoch=11 leaves no epoch of strong augmentation"),
])
def test_unsupported_deim_settings_stop_at_load_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_det_config(["recipe=det_demo_deim", *overrides])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("recipe, overrides, message", [
    # a length in steps: the epoch keys are checked once the data's size gives the epochs (300 steps: 3)
    ("det_demo_deim", ["train.steps=300"], r"data\.mosaic_epochs=\[0\.5, 6\] runs past the strong augmentations, "
                                            r"which stop at epoch 2 \(train\.steps=300 \(3 epochs\)"),
    ("det_demo_deim", ["optim.warmup_steps=700"], r"optim\.warmup_steps=700 runs past the flat stretch"),
    ("det_demo", ["data.mosaic_prob=0.5"], r"data\.mosaic_prob=0\.5 has no epoch to act in"),
])
def test_settings_that_need_the_data_size_stop_before_training(recipe, overrides, message):
    cfg = load_det_config([f"recipe={recipe}", *overrides])
    with pytest.raises(ConfigError, match=message) as error:
        plan_steps(cfg, 800, 1)
    assert "\n" not in str(error.value)
