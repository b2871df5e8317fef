"""Detection data in the layouts users keep (YOLO, Roboflow, CVAT, Label Studio) reads as the same targets;
bad input says what and where; the YOLO label cache spares the second read; a run trains from a YOLO YAML."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from distill.data import yolo
from distill.data.coco import CocoDetection
from distill.data.det_layouts import resolve_layout
from distill.data.shapes import draw_shape, random_background
from distill.detection.recipe import DetDataConfig
from distill.data.coco import CocoFormatError
from distill.errors import ConfigError

NAMES = ["circle", "square", "triangle"]
SIZES = [(96, 64), (64, 80), (80, 80), (72, 56)]  # (width, height): not square, so a swapped axis shows


def make_pool(folder: Path) -> dict[str, list]:
    """Images of a few drawn shapes per split: {split: [(file name, width, height, [(class, x0, y0, x1, y1)])]}."""
    rng = np.random.default_rng(0)
    pool = {}
    for split, count in (("train", 8), ("val", 4)):
        (folder / split).mkdir(parents=True)
        items = []
        for i in range(count):
            w, h = SIZES[i % len(SIZES)]
            image = random_background(h, w, rng)
            objects = []
            for _ in range(1 + i % 3):
                cls = int(rng.integers(len(NAMES)))
                size = float(rng.uniform(14, 30))
                center = (float(rng.uniform(size / 2, w - size / 2)), float(rng.uniform(size / 2, h - size / 2)))
                box = draw_shape(image, NAMES[cls], center, size, (220, 40, 40), 0.0, "solid", rng)
                x0, y0, x1, y1 = (float(np.clip(v, 0, lim)) for v, lim in zip(box, (w, h, w, h)))
                objects.append((cls, x0, y0, x1, y1))
            name = f"{split}_{i:03d}.png"
            Image.fromarray(image).save(folder / split / name)
            items.append((name, w, h, objects))
        pool[split] = items
    return pool


def write_yolo(pool, src: Path, root: Path) -> Path:
    for split, items in pool.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for name, w, h, objects in items:
            shutil.copy(src / split / name, root / "images" / split / name)
            lines = [f"{c} {(x0 + x1) / 2 / w:.8f} {(y0 + y1) / 2 / h:.8f} {(x1 - x0) / w:.8f} {(y1 - y0) / h:.8f}"
                     for c, x0, y0, x1, y1 in objects]
            (root / "labels" / split / name.replace(".png", ".txt")).write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\n"
                                    f"names: {{{', '.join(f'{i}: {n}' for i, n in enumerate(NAMES))}}}\n")
    return root


def coco_dict(items, first_category: int, first_image: int, file_name=lambda n: n, categories=None) -> dict:
    images, annotations = [], []
    for i, (name, w, h, objects) in enumerate(items):
        images.append({"id": first_image + i, "file_name": file_name(name), "width": w, "height": h})
        for c, x0, y0, x1, y1 in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": first_image + i,
                                "category_id": first_category + c, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "segmentation": []})
    categories = categories or [{"id": first_category + i, "name": n} for i, n in enumerate(NAMES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_roboflow(pool, src: Path, root: Path) -> Path:
    """train/ and valid/, each with its images and _annotations.coco.json led by the placeholder category."""
    categories = [{"id": 0, "name": "shapes-xyz", "supercategory": "none"}]
    categories += [{"id": i + 1, "name": n, "supercategory": "shapes-xyz"} for i, n in enumerate(NAMES)]
    for split, folder in (("train", "train"), ("val", "valid")):
        (root / folder).mkdir(parents=True)
        for name, *_ in pool[split]:
            shutil.copy(src / split / name, root / folder / name)
        coco = coco_dict(pool[split], 1, 0, categories=categories)
        (root / folder / "_annotations.coco.json").write_text(json.dumps(coco))
    return root


def write_cvat(pool, src: Path, root: Path) -> Path:
    """annotations/instances_{train,val}.json beside images/{train,val}/, category ids from 1."""
    (root / "annotations").mkdir(parents=True)
    for split in pool:
        (root / "images" / split).mkdir(parents=True)
        for name, *_ in pool[split]:
            shutil.copy(src / split / name, root / "images" / split / name)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco_dict(pool[split], 1, 1)))
    return root


def write_labelstudio(pool, src: Path, root: Path) -> Path:
    """One export per split: train/ and val/, each result.json beside images/, names `images/x.png`, ids from 0."""
    for split in pool:
        (root / split / "images").mkdir(parents=True)
        for name, *_ in pool[split]:
            shutil.copy(src / split / name, root / split / "images" / name)
        coco = coco_dict(pool[split], 0, 0, file_name=lambda n: f"images/{n}")
        (root / split / "result.json").write_text(json.dumps(coco))
    return root


WRITERS = {"yolo": write_yolo, "roboflow": write_roboflow, "cvat": write_cvat, "labelstudio": write_labelstudio}


def data_cfg(root: Path, **keys):
    return OmegaConf.merge(OmegaConf.structured(DetDataConfig), {"root": str(root), **keys})


def load(root: Path, out: Path, **keys) -> tuple[CocoDetection, CocoDetection, str]:
    data = resolve_layout(data_cfg(root, **keys), out)
    train = CocoDetection(data.train.image_dir, data.train.ann_file, True, 64)
    val = CocoDetection(data.val.image_dir, data.val.ann_file, False, 64, categories=train.categories)
    return train, val, data.layout


def targets(dataset: CocoDetection) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Per image base name: its boxes (xyxy pixels) and their class names, in a fixed order."""
    out = {}
    for i in range(len(dataset)):
        with Image.open(dataset.image_path(i)) as image:
            w, h = image.size
        boxes, labels = dataset.annotations(i, w, h)
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1).reshape(-1, 4)
        names = [dataset.class_names[int(k)] for k in labels]
        order = sorted(range(len(names)), key=lambda k: (names[k], *xyxy[k]))
        out[dataset.image_path(i).name] = (xyxy[order], [names[k] for k in order], (w, h))
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    pool = make_pool(base / "pool")
    roots = {fmt: writer(pool, base / "pool", base / fmt) for fmt, writer in WRITERS.items()}
    return pool, roots


def test_every_layout_reads_as_the_same_targets(layouts, tmp_path, caplog):
    pool, roots = layouts
    expected = {name: (np.array([o[1:] for o in objs]).reshape(-1, 4), [NAMES[o[0]] for o in objs], (w, h))
                for split in pool for name, w, h, objs in pool[split]}
    for fmt, root in roots.items():
        with caplog.at_level(logging.INFO, logger="distill"):
            caplog.clear()
            train, val, layout = load(root, tmp_path / fmt)
        assert layout == fmt  # found from data.root alone
        assert train.class_names == NAMES, fmt  # Roboflow's placeholder is no class
        assert json.loads((tmp_path / fmt / "data" / "train.json").read_text())["categories"][0]["name"] == "circle"
        found = {**targets(train), **targets(val)}
        assert sorted(found) == sorted(expected), fmt
        for name, (boxes, names, size) in expected.items():
            got_boxes, got_names, got_size = found[name]
            order = sorted(range(len(names)), key=lambda k: (names[k], *boxes[k]))
            assert got_size == size and got_names == [names[k] for k in order], (fmt, name)
            np.testing.assert_allclose(got_boxes, boxes[order], atol=1e-3 * max(size), err_msg=f"{fmt} {name}")
        # an image decodes and its target is in the detector's form
        item = val[0]
        assert item["target"]["boxes"].shape[1] == 4 and item["image"].dtype == torch.uint8
        line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")][-1]
        total = sum(len(o) for _, _, _, o in pool["train"])
        assert f"train {len(pool['train'])} images, {total} boxes" in line and "3 classes" in line, line


def test_yolo_polygons_lists_and_images_without_labels(layouts, tmp_path):
    pool, roots = layouts
    root = tmp_path / "yolo"
    shutil.copytree(roots["yolo"], root)
    name, w, h, objects = pool["train"][0]
    label = root / "labels" / "train" / name.replace(".png", ".txt")
    c, x0, y0, x1, y1 = objects[0]
    # the first object as a polygon (a diamond inside its box): its box is the polygon's extent
    poly = [((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2)]
    lines = label.read_text().splitlines()
    lines[0] = f"{c} " + " ".join(f"{x / w:.8f} {y / h:.8f}" for x, y in poly)
    label.write_text("\n".join(lines) + "\n")
    (root / "labels" / "train" / pool["train"][1][0].replace(".png", ".txt")).unlink()  # a background image
    # the validation split as a list file, and names as a list
    (root / "val.txt").write_text("".join(f"./images/val/{n}\n" for n, *_ in pool["val"]))
    (root / "data.yaml").write_text(f"train: [images/train]\nval: val.txt\nnames: {NAMES}\nnc: 3\n")
    train, val, _ = load(root, tmp_path / "run")
    got = targets(train)
    np.testing.assert_allclose(got[name][0][got[name][1].index(NAMES[c])], [x0, y0, x1, y1], atol=1e-3 * w)
    assert len(got[pool["train"][1][0]][1]) == 0
    assert len(val) == len(pool["val"]) and train.class_names == NAMES


def one_line(exc) -> str:
    """The error's message, checked to be one line of an error type the entry points print as `error: ...`."""
    text = str(exc.value)
    assert "\n" not in text and isinstance(exc.value, (ConfigError, CocoFormatError))
    return text


@pytest.mark.parametrize("line,words", [("1 0.5 0.5 0.2", ["expected", "5 fields", "got 4"]),
                                        ("3 0.5 0.5 0.2 0.2", ["class 3", "0..2"]),
                                        ("0 0.5 0.5 wide 0.2", ["not numbers"])])
def test_a_bad_label_line_is_an_error_naming_file_and_line(layouts, tmp_path, line, words):
    _, roots = layouts
    root = tmp_path / "yolo"
    shutil.copytree(roots["yolo"], root)
    label = sorted((root / "labels" / "train").iterdir())[2]
    label.write_text(label.read_text() + line + "\n")
    number = len(label.read_text().splitlines())
    with pytest.raises(ConfigError) as e:
        load(root / "data.yaml", tmp_path / "run")
    assert f"{label}:{number}:" in one_line(e) and all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "run" / "data" / "train.json").exists()


def test_boxes_outside_the_image_are_clipped_and_counted(layouts, tmp_path, caplog):
    pool, roots = layouts
    root = tmp_path / "yolo"
    shutil.copytree(roots["yolo"], root)
    name, w, h, _ = pool["train"][0]
    label = root / "labels" / "train" / name.replace(".png", ".txt")
    label.write_text(label.read_text() + "1 0.95 0.5 0.3 0.2\n" + "2 1.5 0.5 0.2 0.2\n")  # over the edge; outside
    with caplog.at_level(logging.WARNING, logger="distill"):
        train, _, _ = load(root, tmp_path / "run")
    warning = [r.getMessage() for r in caplog.records if "outside their image" in r.getMessage()]
    assert len(warning) == 1 and "2 boxes" in warning[0] and "1 wholly outside" in warning[0]
    assert f"{label}:{len(pool['train'][0][3]) + 1}" in warning[0]
    boxes, names, _ = targets(train)[name]
    assert len(names) == len(pool["train"][0][3]) + 1 and boxes[:, 2].max() <= w  # clipped at the right edge
    assert any(abs(b[0] - 0.8 * w) < 1e-2 * w and abs(b[2] - w) < 1e-3 * w for b in boxes)


def test_an_unreadable_image_is_skipped_and_listed(layouts, tmp_path, caplog):
    pool, roots = layouts
    root = tmp_path / "yolo"
    shutil.copytree(roots["yolo"], root)
    victim = root / "images" / "train" / pool["train"][3][0]
    victim.write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="distill"):
        train, _, _ = load(root, tmp_path / "run")
    warning = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warning) == 1 and str(victim) in warning[0] and warning[0].startswith("data: 1 images")
    index = next(i for i in range(len(train)) if train.image_path(i) == victim)
    item = train[index]  # training takes the next image and lists the unreadable one
    assert [Path(name).name for name in item["skipped"]] == [victim.name] and item["image"] is not None


def test_a_missing_split_names_the_key_and_the_path(layouts, tmp_path):
    _, roots = layouts
    root = tmp_path / "yolo"
    shutil.copytree(roots["yolo"], root)
    (root / "data.yaml").write_text(f"train: images/train\nval: images/validation\nnames: {NAMES}\n")
    with pytest.raises(ConfigError) as e:
        load(root, tmp_path / "run")
    missing = root / "images" / "validation"
    assert "val: images/validation" in one_line(e) and f"{missing}) does not exist" in str(e.value)
    (root / "data.yaml").write_text(f"train: images/train\nnames: {NAMES}\n")
    with pytest.raises(ConfigError) as e:
        load(root, tmp_path / "run")
    assert "no 'val' split" in one_line(e) and "data.yaml" in str(e.value)

    rf = tmp_path / "roboflow"
    shutil.copytree(roots["roboflow"], rf)
    shutil.rmtree(rf / "valid")
    with pytest.raises(ConfigError) as e:
        load(rf, tmp_path / "run")
    assert "no val split" in one_line(e) and str(rf / "valid" / "_annotations.coco.json") in str(e.value)


def test_a_training_split_without_labels_is_warned_of(layouts, tmp_path, caplog):
    _, roots = layouts
    root = tmp_path / "yolo"
    shutil.copytree(roots["yolo"], root)
    shutil.rmtree(root / "labels" / "train")
    with caplog.at_level(logging.WARNING, logger="distill"):
        load(root, tmp_path / "run")
    assert any("has no boxes at all" in r.getMessage() and "data.yaml (train)" in r.getMessage()
               for r in caplog.records)


def test_the_label_cache_spares_the_second_read_and_follows_changes(layouts, tmp_path, monkeypatch):
    pool, roots = layouts
    root = tmp_path / "yolo"
    shutil.copytree(roots["yolo"], root)
    images = sorted((root / "images" / "train").iterdir())
    first = yolo.read_split(images, 3)
    assert not first.from_cache and first.cache_file == root / "labels" / "train.cache" and first.cache_file.is_file()

    opened = []
    real_parse, real_open = yolo.parse_label_file, yolo.Image.open
    monkeypatch.setattr(yolo, "parse_label_file", lambda p, n: opened.append(p) or real_parse(p, n))
    monkeypatch.setattr(yolo.Image, "open", lambda p, *a: opened.append(p) or real_open(p, *a))
    second = yolo.read_split(images, 3)
    assert second.from_cache and opened == []  # no label file and no image opened
    for field in ("width", "height", "offsets", "boxes", "classes"):
        np.testing.assert_array_equal(getattr(second, field), getattr(first, field))

    label = root / "labels" / "train" / images[0].name.replace(".png", ".txt")
    label.write_text(label.read_text() + "0 0.5 0.5 0.1 0.1\n")  # a changed file: parsed again
    third = yolo.read_split(images, 3)
    assert not third.from_cache and len(third.boxes) == len(first.boxes) + 1


def test_splits_sharing_a_labels_folder_keep_a_cache_each(layouts, tmp_path, caplog):
    _, roots = layouts
    root = tmp_path / "yolo"
    shutil.copytree(roots["yolo"], root)
    (root / "val.txt").write_text("./images/train/train_000.png\n./images/train/train_001.png\n")
    (root / "data.yaml").write_text(f"train: images/train\nval: val.txt\nnames: {NAMES}\n")
    load(root, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="distill"):
        load(root, tmp_path / "run")
    assert sum("labels read from the cache" in r.getMessage() for r in caplog.records) == 2
    assert (root / "labels" / "train.cache").is_file() and (root / "labels" / "val.cache").is_file()


def test_the_cache_falls_back_to_the_run_folder_where_the_labels_are_read_only(layouts, tmp_path, monkeypatch):
    _, roots = layouts
    root = tmp_path / "yolo"
    shutil.copytree(roots["yolo"], root)
    images = sorted((root / "images" / "train").iterdir())
    real = yolo._atomic_write

    def read_only(path, write):
        if Path(path).parent == root / "labels":
            raise PermissionError(13, "Permission denied")
        real(path, write)

    monkeypatch.setattr(yolo, "_atomic_write", read_only)
    fallback = tmp_path / "run" / "data" / "train.labels.cache"
    assert yolo.read_split(images, 3, "train", fallback).cache_file == fallback and fallback.is_file()
    assert yolo.read_split(images, 3, "train", fallback).from_cache


# --------------------------------------------------------------------------------------------------
# A run from a YOLO YAML alone
# --------------------------------------------------------------------------------------------------

TINY = """
model: {backbone: test_efficientnet, hidden_dim: 32, dim_feedforward: 64, num_heads: 2, num_queries: 10,
        num_decoder_layers: 1, num_points: 2, num_denoising: 4}
data: {root: %s, img_size: 64, multiscale: [], batch_size: 4, val_batch_size: 4, num_workers: 0}
optim: {lr: 0.001, backbone_lr: 0.001, warmup_steps: 1, clip_grad: 1.0}
train: {steps: 2, ckpt_every: 2, log_every: 1, ema_warmups: 0, no_aug_epochs: 0, precision: 'no', trackers: [jsonl]}
eval: {visualize: 0, num_top: 10}
"""


def test_a_run_trains_from_a_yolo_yaml_alone(layouts, tmp_path, fresh_accelerate_state, capsys):
    from distill.finetune_det import main

    _, roots = layouts
    (tmp_path / "tiny.yaml").write_text(TINY % (roots["yolo"] / "data.yaml"))
    s = main([f"recipe={tmp_path / 'tiny.yaml'}", f"output_dir={tmp_path / 'run'}"])
    assert s["steps"] == 2 and s["metrics"]["eval_images"] == 4
    assert s["config"]["model"]["num_classes"] == 3
    assert [c["name"] for c in json.loads((tmp_path / "run" / "categories.json").read_text())] == NAMES

    with pytest.raises(SystemExit) as e:
        main([f"recipe={tmp_path / 'tiny.yaml'}", f"output_dir={tmp_path / 'other'}", "model.num_classes=5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "model.num_classes=5 but the training data has 3 classes" in err


def test_a_malformed_export_or_an_unknown_folder_is_one_line(layouts, tmp_path):
    _, roots = layouts
    ls = tmp_path / "labelstudio"
    shutil.copytree(roots["labelstudio"], ls)
    coco = json.loads((ls / "train" / "result.json").read_text())
    del coco["images"][1]["id"]
    (ls / "train" / "result.json").write_text(json.dumps(coco))
    with pytest.raises(CocoFormatError) as e:
        load(ls, tmp_path / "run")
    assert f"{ls / 'train' / 'result.json'}: not COCO instances" in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        load(tmp_path / "empty", tmp_path / "run")
    assert "no detection layout found" in one_line(e) and "data.format" in str(e.value)


def test_the_other_processes_wait_for_the_main_process_outside_any_collective(layouts, tmp_path, monkeypatch,
                                                                              caplog):
    """The main process's result (or error) reaches the others through `<run>/data/ready.json`, carrying the token
    broadcast first: the others poll it (no collective waits through the conversion); an earlier run's marker is
    never taken as ready."""
    from distill.data import det_layouts

    _, roots = layouts
    tokens = iter(["this-run", "this-run"])
    monkeypatch.setattr(det_layouts.secrets, "token_hex", lambda n: next(tokens))
    monkeypatch.setattr("distill.engine.distributed.broadcast_from_main", lambda value: value)
    cfg = OmegaConf.merge(OmegaConf.structured(DetDataConfig), {"root": str(roots["yolo"] / "data.yaml")})
    marker = tmp_path / "run" / "data" / "ready.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"token": "an-earlier-run", "error": "stale"}))
    result = det_layouts.prepare_detection_data(cfg, tmp_path / "run", is_main=True)

    # a waiting process: the clock advances only while it sleeps; the marker appears after 3 minutes of polling,
    # first an earlier run's (not ready), then this run's
    written = marker.read_text()
    clock = [0.0]

    def sleep(seconds):
        clock[0] += seconds
        if clock[0] >= 180:
            marker.write_text(written)
        elif clock[0] >= 100:
            marker.write_text(json.dumps({"token": "an-earlier-run", "error": "stale"}))

    marker.unlink()
    monkeypatch.setattr(det_layouts.time, "sleep", sleep)
    monkeypatch.setattr(det_layouts.time, "monotonic", lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="distill"):
        got = det_layouts.data_from(det_layouts.wait_for(marker, "this-run", 3600, "late", poll_s=2.0))
    assert got == result and clock[0] >= 180
    assert sum("still waiting for the main process" in r.getMessage() for r in caplog.records) == 2  # at 1 and 2 min

    # no marker within the limit: one line, not a wait for ever (a run folder some node does not see)
    clock[0] = 0.0
    with pytest.raises(ConfigError, match="never appeared"):
        det_layouts.wait_for(tmp_path / "elsewhere" / "started.json", "this-run", 300, "never appeared")
    assert 300 <= clock[0] < 310

    # the main process's error (an interrupt too): its one line on every process, the marker written before it
    # raises
    def fail(*args):
        raise KeyboardInterrupt("stopped by hand")

    monkeypatch.setattr(det_layouts, "resolve_layout", fail)
    with pytest.raises(KeyboardInterrupt):
        det_layouts.prepare_detection_data(cfg, tmp_path / "run2", is_main=True)
    with pytest.raises(ConfigError) as e:
        det_layouts.wait_for(tmp_path / "run2" / "data" / "ready.json", "this-run", 300, "late")
    assert one_line(e) == "the main process could not read the data: KeyboardInterrupt: stopped by hand"


def test_a_coco_layout_is_read_in_place_by_every_process_without_waiting(layouts, tmp_path, monkeypatch):
    from distill.data import det_layouts

    _, roots = layouts
    monkeypatch.setattr("distill.engine.distributed.broadcast_from_main", lambda value: pytest.fail("a collective"))
    # the Roboflow export's files named key by key: the COCO layout
    cfg = OmegaConf.merge(OmegaConf.structured(DetDataConfig), {
        "root": str(roots["roboflow"]), "train_images": "train", "train_ann": "train/_annotations.coco.json",
        "val_images": "valid", "val_ann": "valid/_annotations.coco.json"})
    got = det_layouts.prepare_detection_data(cfg, tmp_path / "run", is_main=False)
    assert got.layout == "coco" and not (tmp_path / "run" / "data").exists()
