"""Shard writing and reading: round trip, manifests, shard specs, undecodable samples."""
import json

import numpy as np
import pytest

from distill.data.shards import (
    CorruptSampleError,
    SkipCounter,
    decode_sample,
    encode_jpeg,
    expand_shards,
    iter_shard,
    read_manifest,
    write_shards,
)


def gradient_image(seed: int, h=24, w=32) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    # smooth ramps, a different one per channel, so a swapped channel order would show
    return np.stack([xs * 7, ys * 9, np.full_like(xs, 40 + 10 * seed)], -1).astype(np.uint8)


def read_all(folder):
    out = []
    for shard in sorted(folder.glob("*.tar")):
        out += [(s["__key__"], *decode_sample(s)) for s in iter_shard(str(shard), lambda exc: False)]
    return out


def test_round_trip_and_manifest(tmp_path):
    images = [gradient_image(i) for i in range(7)]
    samples = [(f"k{i}", encode_jpeg(im) if i % 2 else im, i % 3) for i, im in enumerate(images)]
    paths = write_shards(samples, tmp_path, prefix="part", maxcount=3)
    assert [p.name for p in paths] == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]

    got = read_all(tmp_path)
    assert [k for k, _, _ in got] == [f"k{i}" for i in range(7)]
    assert [y for _, _, y in got] == [i % 3 for i in range(7)]
    for (_, image, _), original in zip(got, images):
        assert image.shape == original.shape and image.dtype == np.uint8
        assert np.abs(image.astype(int) - original.astype(int)).mean() < 3  # JPEG q95, RGB order kept

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_samples"] == 7 and manifest["num_classes"] == 3
    assert manifest["class_counts"] == {"0": 3, "1": 2, "2": 2}
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert read_manifest(tmp_path) == manifest
    assert read_manifest([str(p) for p in paths[1:]])["num_samples"] == 4
    (tmp_path / "other").mkdir()
    assert read_manifest(tmp_path / "other") is None


def test_empty_input_writes_no_shard(tmp_path):
    assert write_shards([], tmp_path) == []
    assert not list(tmp_path.glob("*.tar"))
    assert json.loads((tmp_path / "manifest.json").read_text())["num_samples"] == 0


def test_expand_shards_patterns_folders_and_missing(tmp_path):
    write_shards([(f"k{i}", gradient_image(i), 0) for i in range(4)], tmp_path / "set", maxcount=1)
    by_pattern = expand_shards("set/shard-{000000..000003}.tar", tmp_path)
    assert by_pattern == [str(tmp_path / f"set/shard-00000{i}.tar") for i in range(4)]
    assert expand_shards("set", tmp_path) == by_pattern
    assert expand_shards(["set/shard-000001.tar", str(tmp_path / "set/shard-000000.tar")], tmp_path) == [
        str(tmp_path / "set/shard-000001.tar"), str(tmp_path / "set/shard-000000.tar")]
    with pytest.raises(FileNotFoundError, match=r"shard-\{000000\.\.000009\}.*6 of 10 shards missing.*shard-000004"):
        expand_shards("set/shard-{000000..000009}.tar", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.tar"):
        expand_shards("empty", tmp_path)


def test_decode_errors_name_the_sample():
    good = {"__key__": "a", "__url__": "x.tar", "jpg": encode_jpeg(gradient_image(0)), "cls": b"4"}
    assert decode_sample(good)[1] == 4
    with pytest.raises(CorruptSampleError, match=r"'bad' in /data/s-3\.tar.*could not be decoded"):
        decode_sample({**good, "__key__": "bad", "__url__": "/data/s-3.tar", "jpg": b"not a jpeg"})
    with pytest.raises(CorruptSampleError, match="non-integer 'cls'"):
        decode_sample({**good, "cls": b"cat"})
    with pytest.raises(CorruptSampleError, match="no jpg"):
        decode_sample({"__key__": "c", "cls": b"1"})


def test_missing_and_truncated_shards_are_counted_not_raised(tmp_path):
    write_shards([(f"k{i}", gradient_image(i), 0) for i in range(20)], tmp_path, maxcount=20)
    shard = tmp_path / "shard-000000.tar"
    data = shard.read_bytes()
    # cut inside the JPEG bytes of a middle member (a cut inside a tar header block reads as a clean end)
    starts = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xd8"]
    (tmp_path / "cut.tar").write_bytes(data[: starts[len(starts) // 2] + 50])
    skips = SkipCounter()
    assert list(iter_shard(str(tmp_path / "gone.tar"), skips)) == [] and skips.count == 1
    partial = list(iter_shard(str(tmp_path / "cut.tar"), skips))
    assert 0 < len(partial) < 20 and skips.count >= 2
