"""The custom-set benchmark's pieces: its generated detection set read as YOLO data, the richer pretraining set's
class count, and the seed statistics' interval."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from distill.data.custom_det import KINDS, ensure_custom_det, generate_custom_det
from distill.data.det_layouts import read_yolo
from distill.data.synthetic import GENERATE_KINDS, class_attributes, generate_classification

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from paired_stats import paired_table, t95, t_interval  # noqa: E402


def test_custom_set_reads_as_yolo_with_boxes_inside_images(tmp_path):
    data_yaml = ensure_custom_det(tmp_path / "custom", num_train=12, num_val=6, img_size=64)
    splits = read_yolo(data_yaml, tmp_path / "run")
    for key, count in (("train", 12), ("val", 6)):
        coco = splits[key][0]
        assert len(coco["images"]) == count and not coco["_unreadable"]
        assert [c["name"] for c in coco["categories"]] == list(KINDS)
        sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        assert len(coco["annotations"]) >= count  # every image holds at least one object
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            width, height = sizes[a["image_id"]]
            assert 0 <= a["category_id"] < len(KINDS)
            tol = 1e-5 * width  # the labels' six decimals, in pixels
            assert w > 0 and h > 0 and x >= -tol and y >= -tol
            assert x + w <= width + tol and y + h <= height + tol
    labels = sorted(p.read_text() for p in (tmp_path / "custom" / "labels" / "train").glob("*.txt"))
    assert len({line.split()[0] for text in labels for line in text.splitlines()}) > 1  # several kinds drawn


def test_custom_set_is_deterministic_from_its_seed(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_custom_det(tmp_path / name, num_train=4, num_val=1, img_size=48, seed=seed)
    read = lambda name: [p.read_text() for p in sorted((tmp_path / name / "labels" / "train").glob("*.txt"))]
    assert read("a") == read("b") and read("a") != read("c")


def test_rich_pretraining_set_has_every_promised_class(tmp_path):
    kw = {**GENERATE_KINDS["demo_rich"], "train_per_class": 1, "val_per_class": 1}
    assert kw["num_classes"] >= 30
    assert len(set(class_attributes(kw["num_classes"]))) == kw["num_classes"]
    out = generate_classification(tmp_path, img_size=16, **{k: v for k, v in kw.items() if k != "img_size"})
    manifest = out["splits"]["train"]
    assert len(manifest["classes"]) == kw["num_classes"] == 56
    labels = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert labels["generator"]["num_classes"] == 56


def test_t_interval_matches_the_known_value(monkeypatch):
    # 1..5: mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776 -> half-width 2.776 * sqrt(2.5) / sqrt(5) = 1.963
    mean, low, high = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and math.isclose(high - mean, 1.963, rel_tol=1e-3) and math.isclose(mean - low, high - mean)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # the table, without scipy
    assert math.isclose(t95(4), 2.776, rel_tol=1e-3) and math.isclose(t95(11), 2.228, rel_tol=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        t95(0)


def test_paired_table_differences_by_seed():
    table = paired_table({"random": {0: 0.5, 1: 0.3, 2: 0.4}, "other": {0: 0.6, 1: 0.5, 2: 0.5}}, "random")
    row = next(line for line in table.splitlines() if line.startswith("| other"))
    assert "+10.0 / +20.0 / +10.0" in row
    mean, low, high = t_interval([10.0, 20.0, 10.0])
    assert f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]" in row and np.isclose(mean, 40 / 3)
