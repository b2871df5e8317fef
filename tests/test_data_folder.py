"""scripts/folder_to_shards.py on small generated image folders: class folders, ImageNet-validation layout,
parallel writing, resuming, errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from distill.data.shards import decode_sample, expand_shards, iter_shard
from distill.data.synthetic import class_attributes, render_sample

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "folder_to_shards.py"
sys.path.insert(0, str(SCRIPT.parent))  # importable by name, so worker processes can unpickle its writer
import folder_to_shards as f2s  # noqa: E402


def read_all(folder: Path) -> dict:
    return {s["__key__"]: (s, *decode_sample(s)) for url in expand_shards(".", folder)
            for s in iter_shard(url, lambda exc: False)}


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
    report = subprocess.run(  # default --workers: a process per core
        [sys.executable, str(SCRIPT), str(src), str(out), "--maxcount", "4", "--resize-short", "48"],
        capture_output=True, text=True, timeout=300,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert "wrote 15 samples of 3 classes into 4 shards" in report.stdout
    assert "skipped 1 unreadable images" in report.stderr and "broken.jpg" in report.stderr

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == sorted(names)  # ImageFolder numbering: sorted folder names
    assert manifest["num_samples"] == 15 and manifest["class_counts"] == {"0": 5, "1": 5, "2": 5}
    assert sorted(s["num_samples"] for s in manifest["shards"]) == [3, 4, 4, 4]  # the broken file's shard has 3
    assert manifest["skipped"] == 1 and manifest["skipped_files"][0].endswith("broken.jpg: not a readable image")
    assert not (out / ".progress").exists()

    by_key = read_all(out)
    assert len(by_key) == 15
    for key, (_, image, label) in by_key.items():
        assert manifest["classes"][label] == key.split("__")[0]  # the label matches the image's folder
        assert min(image.shape[:2]) == (48 if key.endswith("img_0") else 40)  # only the 64 px ones shrink
    # labels are spread over shards (shuffled), not one class per shard
    first_shard = [s["cls"] for s in iter_shard(str(out / manifest["shards"][0]["name"]), lambda e: False)]
    assert len(set(first_shard)) > 1
    original = (src / "zebra" / "img.2.jpg").read_bytes()
    assert by_key["zebra__img_2"][0]["jpg"] == original  # JPEG files are stored untouched


def test_interrupted_conversion_resumes(tree, tmp_path, monkeypatch):
    src, _ = tree
    full = f2s.convert(src, tmp_path / "full", maxcount=3, workers=0, progress=False)

    out, calls = tmp_path / "resumed", []
    write = f2s.ShardWriter.__call__

    def dies_after_two(self, job):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(job[0])
        return write(self, job)

    monkeypatch.setattr(f2s.ShardWriter, "__call__", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        f2s.convert(src, out, maxcount=3, workers=0, progress=False)
    assert not (out / "manifest.json").exists() and len(list(out.glob("*.tar"))) == 2
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}

    with pytest.raises(f2s.ConversionError, match=r"other settings \(\['maxcount'\]\)"):
        f2s.convert(src, out, maxcount=4, workers=0, progress=False)

    monkeypatch.setattr(f2s.ShardWriter, "__call__", write)
    calls.clear()
    resumed = f2s.convert(src, out, maxcount=3, workers=2, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in finished} == finished
    assert resumed["shards"] == full["shards"] and resumed["class_counts"] == full["class_counts"]
    for name in [s["name"] for s in full["shards"]]:  # same images in the same shards as an uninterrupted run
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    assert f2s.convert(src, out, maxcount=3, workers=0, progress=False) == resumed  # done: nothing to do
    with pytest.raises(f2s.ConversionError, match="another conversion"):
        f2s.convert(src, out, maxcount=5, workers=0, progress=False)


@pytest.fixture
def val_folder(tmp_path):
    """A flat folder of 6 images of 3 classes named by wnid-like names, as ImageNet's validation set."""
    rng = np.random.default_rng(1)
    attrs = class_attributes(3)
    folder = tmp_path / "val"
    folder.mkdir()
    truth = {}
    for i in range(6):
        label = [2, 0, 1, 1, 0, 2][i]
        name = f"ILSVRC2012_val_{i + 1:08d}"
        cv2.imwrite(str(folder / f"{name}.JPEG"), render_sample(label, attrs, 40, rng)[..., ::-1])
        truth[name] = f"n0{label}"
    return folder, truth


def test_imagenet_validation_layout(val_folder, tmp_path):
    folder, truth = val_folder
    csv = tmp_path / "LOC_val_solution.csv"  # Kaggle's layout: header, image id, wnid first in a box list
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"{name},{wnid} 1 2 30 40 {wnid} 3 4 20 20\n" for name, wnid in reversed(truth.items())))
    classes = tmp_path / "classes.txt"  # numbering from elsewhere (e.g. the training manifest)
    classes.write_text("n02\nn00\nn01\n")
    assert f2s.main([str(folder), str(tmp_path / "a"), "--labels", str(csv), "--classes", str(classes),
                     "--workers", "0"]) == 0
    got = {key: label for key, (_, _, label) in read_all(tmp_path / "a").items()}
    assert got == {name: ["n02", "n00", "n01"].index(wnid) for name, wnid in truth.items()}
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["classes"] == ["n02", "n00", "n01"] and manifest["num_samples"] == 6

    synsets = tmp_path / "synset_labels.txt"  # one wnid per line, images in sorted name order
    synsets.write_text("".join(f"{truth[name]}\n" for name in sorted(truth)))
    assert f2s.main([str(folder), str(tmp_path / "b"), "--labels", str(synsets), "--workers", "0"]) == 0
    got = {key: label for key, (_, _, label) in read_all(tmp_path / "b").items()}
    assert got == {name: int(wnid[-1]) for name, wnid in truth.items()}  # sorted names: n00, n01, n02


@pytest.mark.parametrize("labels, message", [
    ("ILSVRC2012_val_00000001,n00\n", "5 images .* have no label"),
    ("".join(f"ILSVRC2012_val_{i:08d} n0{i % 3}\n" for i in range(1, 7)) + "ILSVRC2012_val_00000099 n00\n",
     r"line 7: no image 'ILSVRC2012_val_00000099'"),
    ("n00\nn01\n", "2 lines for 6 images"),
    ("".join(f"{i % 3 + 1}\n" for i in range(6)), "numeric labels"),
])
def test_label_file_errors_name_the_problem(val_folder, tmp_path, labels, message, capsys):
    folder, _ = val_folder
    path = tmp_path / "labels.txt"
    path.write_text(labels)
    assert f2s.main([str(folder), str(tmp_path / "out"), "--labels", str(path), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "labels.txt" in err
    assert re.search(message, err), err


def test_folder_without_classes_is_an_error(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    assert f2s.main([str(tmp_path / "flat"), str(tmp_path / "out")]) == 2
    assert "no class subfolders" in capsys.readouterr().err
