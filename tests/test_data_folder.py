"""scripts/folder_to_shards.py on a small generated ImageFolder tree."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from distill.data.shards import decode_sample, iter_shard
from distill.data.synthetic import class_attributes, render_sample

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "folder_to_shards.py"


@pytest.fixture
def tree(tmp_path):
    """3 classes (folder names not in label order) of generated shape images, PNG and JPEG, one broken file."""
    rng = np.random.default_rng(0)
    attrs = class_attributes(3)
    names = ["zebra", "apple", "mango"]
    for label, name in enumerate(names):
        folder = tmp_path / "src" / name
        (folder / "nested").mkdir(parents=True)
        for i in range(5):
            image = render_sample(label, attrs, 40 if i else 64, rng)
            path = folder / ("nested" if i == 4 else "") / f"img.{i}.{'png' if i % 2 else 'jpg'}"
            cv2.imwrite(str(path), image[..., ::-1])
    (tmp_path / "src" / "apple" / "broken.jpg").write_bytes(b"\xff\xd8\xffnot really")
    (tmp_path / "src" / "apple" / "notes.txt").write_text("not an image")
    return tmp_path / "src", names


def test_folder_to_shards(tree, tmp_path):
    src, names = tree
    out = tmp_path / "shards"
    report = subprocess.run(
        [sys.executable, str(SCRIPT), str(src), str(out), "--maxcount", "4", "--resize-short", "48", "--workers", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert "wrote 15 samples of 3 classes into 4 shards" in report.stdout
    assert "skipped 1 unreadable images" in report.stderr and "broken.jpg" in report.stderr

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == sorted(names)  # ImageFolder numbering: sorted folder names
    assert manifest["num_samples"] == 15 and manifest["class_counts"] == {"0": 5, "1": 5, "2": 5}
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 4, 3]
    assert manifest["skipped"] == 1 and manifest["skipped_files"][0].endswith("broken.jpg: not a readable image")

    by_key = {}
    for shard in sorted(out.glob("*.tar")):
        for sample in iter_shard(str(shard), lambda exc: False):
            by_key[sample["__key__"]] = (sample, *decode_sample(sample))
    assert len(by_key) == 15
    for key, (_, image, label) in by_key.items():
        assert manifest["classes"][label] == key.split("__")[0]  # the label matches the image's folder
        assert min(image.shape[:2]) == (48 if key.endswith("img_0") else 40)  # only the 64 px ones shrink
    # labels are spread over shards (shuffled), not one class per shard
    first_shard = [by_key[k][2] for k in by_key][:4]
    assert len(set(first_shard)) > 1
    original = (src / "zebra" / "img.2.jpg").read_bytes()
    assert by_key["zebra__img_2"][0]["jpg"] == original  # JPEG files are stored untouched


def test_folder_without_classes_is_an_error(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    report = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "flat"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode != 0 and "no class subfolders" in report.stderr
