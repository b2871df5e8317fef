"""The generated classification dataset: drawing primitives, determinism, counts, and real class structure."""
import json

import numpy as np
import pytest
import torch

from distill.data.shapes import PALETTE, SHAPES, TEXTURES, draw_shape, random_background
from distill.data.shards import decode_sample, iter_shard, read_manifest
from distill.data.synthetic import class_attributes, ensure_demo_dataset, generate_classification

SMALL = dict(num_classes=6, train_per_class=40, val_per_class=20, img_size=32, shard_size=50)


def load_split(folder):
    images, labels = [], []
    for shard in sorted(folder.glob("*.tar")):
        for sample in iter_shard(str(shard), lambda exc: False):
            image, label = decode_sample(sample)
            images.append(image)
            labels.append(label)
    return np.stack(images), np.array(labels)


@pytest.mark.parametrize("shape", SHAPES)
def test_draw_shape_box_is_tight_and_inside(shape):
    img = np.zeros((64, 64, 3), np.uint8)
    box = draw_shape(img, shape, (30.5, 34.0), 30, (255, 255, 255), angle=20, texture="solid")
    ys, xs = np.nonzero(img[..., 0] >= 128)
    assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert 10 <= box[2] - box[0] <= 37 and 10 <= box[3] - box[1] <= 37  # a rotated square reaches 0.85 * 30 * 1.41
    assert 12 <= (box[0] + box[2]) / 2 <= 49  # roughly where it was asked to be


def test_draw_shape_textures_differ_and_clip_at_border():
    rng = np.random.default_rng(0)
    fills = []
    for texture in TEXTURES:
        img = np.zeros((48, 48, 3), np.uint8)
        draw_shape(img, "square", (24, 24), 40, PALETTE[0], texture=texture, rng=rng)
        fills.append(img[14:34, 14:34].reshape(-1, 3).std(0).sum())
    assert fills[0] < 1 and all(f > 20 for f in fills[1:])  # solid is flat, textures are not
    img = np.zeros((32, 32, 3), np.uint8)
    box = draw_shape(img, "circle", (0, 0), 20, PALETTE[1])
    assert box[0] == 0 and box[1] == 0 and 8 <= box[2] <= 11
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        draw_shape(img, "blob", (5, 5), 5, PALETTE[0])
    with pytest.raises(ValueError, match="unknown texture"):
        draw_shape(img, "circle", (5, 5), 5, PALETTE[0], texture="plaid")


def test_background_varies_with_rng():
    a = random_background(32, 40, np.random.default_rng(1))
    b = random_background(32, 40, np.random.default_rng(2))
    assert a.shape == (32, 40, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


def test_classes_share_some_attributes_but_are_distinct():
    attrs = class_attributes(20)
    assert len(set(attrs)) == 20
    shapes = [a[0] for a in attrs]
    colours = [a[1] for a in attrs]
    assert len(set(shapes)) < 20 and len(set(colours)) < 20  # features are shared across classes
    with pytest.raises(ValueError, match="num_classes"):
        class_attributes(1000)


def test_generation_is_deterministic_and_counted(tmp_path):
    a = generate_classification(tmp_path / "a", seed=3, extra_per_class=10, **SMALL)
    generate_classification(tmp_path / "b", seed=3, extra_per_class=10, **SMALL)
    generate_classification(tmp_path / "c", seed=4, **SMALL)
    for split in ("train", "val", "extra"):
        shards = sorted((tmp_path / "a" / split).glob("*.tar"))
        assert shards and all(s.read_bytes() == (tmp_path / "b" / split / s.name).read_bytes() for s in shards)
    assert (tmp_path / "a/train/shard-000000.tar").read_bytes() != (tmp_path / "c/train/shard-000000.tar").read_bytes()

    train = a["splits"]["train"]
    assert train["num_samples"] == 6 * 40 and len(train["shards"]) == 5
    assert train["class_counts"] == {str(c): 40 for c in range(6)}
    assert [s["num_samples"] for s in train["shards"]] == [50, 50, 50, 50, 40]
    assert a["splits"]["val"]["num_samples"] == 120
    assert read_manifest(tmp_path / "a" / "val")["classes"][0].endswith("circle")
    images, labels = load_split(tmp_path / "a" / "train")
    assert images.shape == (240, 32, 32, 3) and np.bincount(labels).tolist() == [40] * 6
    assert len(set(labels[:50].tolist())) >= 4  # every shard mixes classes

    extra = a["splits"]["extra"]["class_counts"]
    # 6 of the 60 are object-free images for curation: label -1, no class, so not in the class counts
    assert a["splits"]["extra"]["num_samples"] == 60 and sum(extra.values()) == 54 and "-1" not in extra
    counts = [extra.get(str(c), 0) for c in range(6)]
    assert max(counts) > min(counts)  # an uncurated pool is not balanced


def test_classes_are_learnable_from_pixels(tmp_path):
    """A linear classifier on 8x8 downsampled pixels beats chance (1/6) by far on held-out images."""
    generate_classification(tmp_path, seed=0, **SMALL)
    x_train, y_train = load_split(tmp_path / "train")
    x_val, y_val = load_split(tmp_path / "val")

    def features(x):
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
        return torch.nn.functional.adaptive_avg_pool2d(t, 8).flatten(1)

    ftrain, fval = features(x_train), features(x_val)
    mean, std = ftrain.mean(0), ftrain.std(0) + 1e-6
    ftrain, fval = (ftrain - mean) / std, (fval - mean) / std
    torch.manual_seed(0)
    model = torch.nn.Linear(ftrain.shape[1], 6)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(ftrain), torch.from_numpy(y_train)).backward()
        opt.step()
    accuracy = (model(fval).argmax(1).numpy() == y_val).mean()
    assert accuracy > 0.5, accuracy  # chance is 0.17


def test_ensure_demo_dataset_is_idempotent_and_follows_params(tmp_path):
    root = tmp_path / "demo"
    params = dict(num_classes=3, train_per_class=10, val_per_class=5, img_size=24, shard_size=10)
    assert ensure_demo_dataset(root, **params) == root
    stamp = (root / "train" / "shard-000000.tar").stat().st_mtime_ns
    ensure_demo_dataset(root, **params)
    assert (root / "train" / "shard-000000.tar").stat().st_mtime_ns == stamp  # kept, not rewritten
    ensure_demo_dataset(root, **{**params, "train_per_class": 20})
    assert json.loads((root / "train" / "manifest.json").read_text())["num_samples"] == 60
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    with pytest.raises(TypeError, match="unknown arguments"):
        ensure_demo_dataset(root, colours=3)
