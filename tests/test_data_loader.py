"""The training stream and the loaders: weighted/scheduled mixing, splitting, corrupt data, evaluation."""
import itertools
import logging
import math
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from distill.data.loader import build_eval_loader, build_train_loader
from distill.data.mix import DataMix
from distill.data.stream import MixedStream
from distill.data.shards import encode_jpeg, write_shards
from distill.data.synthetic import generate_classification

IMG = 16


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    generate_classification(root / "set", num_classes=4, train_per_class=20, val_per_class=12, img_size=24,
                            shard_size=10)  # train: 8 shards of 10, val: 5 shards (10, 10, 10, 10, 8)
    return root


def make_mix(root, sources: dict, schedule: str = "") -> DataMix:
    lines = ["sources:"] + [f"  {name}: {{shards: {shards}, augment: {{name: inception}}, weight: {w}}}"
                            for name, (shards, w) in sources.items()]
    path = root / f"mix-{abs(hash((str(sources), schedule)))}.yaml"
    path.write_text("\n".join(lines) + "\n" + schedule)
    return DataMix.load(path, root)


def take(stream, n):
    return list(itertools.islice(iter(stream), n))


def within_binomial(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_sources_follow_their_weights(root):
    mix = make_mix(root, {"a": ("set/train", 1), "b": ("set/train", 1), "c": ("set/train", 2)})
    n = 3000
    samples = take(MixedStream(mix, IMG, seed=0, total_samples=n), n)
    counts = Counter(s["source"] for s in samples)
    for source, p in enumerate([0.25, 0.25, 0.5]):
        assert within_binomial(counts[source], n, p), (counts, source)
    first = samples[0]
    assert first["image"].dtype == torch.uint8 and first["image"].shape == (3, IMG, IMG)
    assert 0 <= first["label"] < 4 and first["skipped"] == 0


def test_sources_follow_a_schedule_and_resume_mid_schedule(root):
    schedule = ("schedule:\n  - {at: 0.0, weights: {a: 9, b: 1}}\n  - {at: 1.0, weights: {a: 1, b: 9}}\n")
    mix = make_mix(root, {"a": ("set/train", 1), "b": ("set/train", 1)}, schedule)
    n = 2000
    sources = np.array([s["source"] for s in take(MixedStream(mix, IMG, seed=1, total_samples=n), n)])
    tolerance = 5 * math.sqrt(0.25 / (n // 2))  # 5 sigma for a share over 1000 draws
    # the share of `a` falls linearly from 0.9 to 0.1: 0.7 on average over the first half, 0.3 over the second
    assert abs((sources[: n // 2] == 0).mean() - 0.7) < tolerance
    assert abs((sources[n // 2:] == 0).mean() - 0.3) < tolerance
    resumed = take(MixedStream(mix, IMG, seed=1, total_samples=n, origin=n // 2), n // 2)
    assert abs(np.mean([s["source"] == 0 for s in resumed]) - 0.3) < tolerance


def test_ranks_and_workers_split_each_pass_exactly(root):
    mix = make_mix(root, {"a": ("set/train", 1)})
    per_pass = mix.num_samples("a")
    assert per_pass == 80 and len(mix.shard_paths("a")) == 8
    keys = []
    for rank in range(2):
        loader = build_train_loader(mix, IMG, batch_size=1, num_workers=2, seed=0, total_samples=10**6,
                                    rank=rank, world_size=2, with_keys=True)
        batches = take(loader, per_pass)  # 40 per process, 20 per worker: two passes over its share of 20
        keys.append([k for b in batches for k in b["key"]])
    first_pass = keys[0][: per_pass // 2] + keys[1][: per_pass // 2]
    second_pass = keys[0][per_pass // 2:] + keys[1][per_pass // 2:]
    assert len(set(first_pass)) == per_pass and len(set(second_pass)) == per_pass
    assert set(first_pass) == set(second_pass)
    assert first_pass != second_pass  # each pass reshuffles the shards


def test_too_few_samples_for_the_readers_is_a_clear_error(tmp_path):
    write_shards([(f"k{i}", np.full((8, 8, 3), 9, np.uint8), 0) for i in range(5)], tmp_path / "tiny")
    mix = make_mix(tmp_path, {"tiny": ("tiny", 1)})
    with pytest.raises(ValueError, match=r"source 'tiny': 5 samples cannot be shared by 2 processes x 3 loader workers"):
        build_train_loader(mix, IMG, 4, num_workers=3, seed=0, total_samples=100, rank=0, world_size=2)


def test_corrupt_samples_are_skipped_and_counted(root, tmp_path, caplog):
    good = np.full((20, 20, 3), 120, np.uint8)
    samples = [(f"ok{i}", good, 1) for i in range(4)] + [("broken", b"\xff\xd8garbage", 99)] + \
              [(f"ok{i}", good, 1) for i in range(4, 8)]
    write_shards(samples, tmp_path / "bad", maxcount=100)
    mix = make_mix(tmp_path, {"a": ("bad", 1)})
    with caplog.at_level(logging.WARNING):
        out = take(MixedStream(mix, IMG, seed=0, total_samples=100), 16)  # two passes
    assert all(s["label"] == 1 for s in out)
    skipped = [s["skipped"] for s in out]
    assert 1 <= sum(skipped) <= 2  # once per pass met
    assert "'broken'" in caplog.text and "bad/shard-000000.tar" in caplog.text


def test_shards_vanishing_mid_training_are_skipped(root, tmp_path, caplog):
    shutil.copytree(root / "set" / "train", tmp_path / "train")
    mix = make_mix(tmp_path, {"a": ("train", 1)})
    stream = iter(MixedStream(mix, IMG, seed=0, total_samples=10**6))
    seen = [next(stream) for _ in range(5)]
    (tmp_path / "train" / "shard-000003.tar").unlink()
    data = (tmp_path / "train" / "shard-000005.tar").read_bytes()
    (tmp_path / "train" / "shard-000005.tar").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        seen += [next(stream) for _ in range(200)]  # more than two passes of the remaining data
    assert sum(s["skipped"] for s in seen) >= 2
    assert "shard-000003.tar" in caplog.text and "shard-000005.tar" in caplog.text


@pytest.mark.parametrize("world_size, workers", [(1, 2), (2, 0), (8, 1)])
def test_eval_loader_sees_every_sample_once(root, world_size, workers):
    keys, total = [], 0
    for rank in range(world_size):
        loader = build_eval_loader("set/val", root, IMG, 0.875, batch_size=7, num_workers=workers, rank=rank,
                                   world_size=world_size, with_keys=True)
        for batch in loader:
            assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, IMG, IMG)
            assert batch["label"].shape == batch["image"].shape[:1]
            keys += batch["key"]
    assert len(keys) == 48 and len(set(keys)) == 48  # split by samples: 8 processes share 5 shards


def test_train_loader_batches(root):
    mix = make_mix(root, {"a": ("set/train", 1), "b": ("set/train", 1)})
    batch = next(iter(build_train_loader(mix, IMG, batch_size=6, num_workers=0, seed=0, total_samples=60)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (6, 3, IMG, IMG)
    assert batch["label"].dtype == torch.long and batch["source"].shape == (6,) and batch["skipped"].sum() == 0


def test_offline_soft_labels_come_with_their_views(tmp_path):
    import io

    import webdataset as wds

    (tmp_path / "views").mkdir()
    jpg = encode_jpeg(np.full((20, 20, 3), 90, np.uint8))
    with wds.TarWriter(str(tmp_path / "views" / "v-000000.tar")) as sink:
        for i in range(6):
            record = np.empty(3, dtype=[("idx", "<i2"), ("prob", "<f2")])
            record["idx"], record["prob"] = [i, (i + 1) % 4, (i + 2) % 4], [0.5, 0.3, 0.2]
            buf = io.BytesIO()
            np.save(buf, record)
            sample = {"__key__": f"v{i}", "jpg": jpg, "cls": str(i % 4).encode()}
            if i != 3:  # a view whose labels went missing
                sample["soft.npy"] = buf.getvalue()
            sink.write(sample)
    mix = make_mix(tmp_path, {"views": ("views", 1)})
    loader = build_train_loader(mix, IMG, batch_size=5, num_workers=0, seed=0, total_samples=100,
                                soft_labels=True, with_keys=True)
    batch = next(iter(loader))
    assert batch["soft_idx"].dtype == torch.long and batch["soft_idx"].shape == (5, 3)
    assert batch["soft_prob"].dtype == torch.float32 and torch.allclose(batch["soft_prob"].sum(1), torch.ones(5))
    assert sorted(batch["key"]) == ["v0", "v1", "v2", "v4", "v5"] and batch["skipped"].sum() == 1
    assert batch["soft_idx"][:, 0].tolist() == [int(k[1:]) for k in batch["key"]]
