"""Faults in the middle of a run: shards that vanish or get cut short while a MixedStream reads them are
counted as skipped, warned about, and the stream goes on."""
import logging
import os
import shutil

import pytest

from distill.data.mix import DataMix
from distill.data.stream import MixedStream
from distill.data.synthetic import generate_classification

SHARD_SIZE = 20  # samples per shard; keys are train-%07d in writing order, so key index // SHARD_SIZE = shard


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    generate_classification(root / "set", num_classes=4, train_per_class=40, val_per_class=0, img_size=24,
                            seed=0, shard_size=SHARD_SIZE)  # 160 samples, 8 shards
    return root


def fresh_copy(dataset, tmp_path):
    shutil.copytree(dataset / "set", tmp_path / "set")
    return tmp_path


def mix_of(root, sources: dict):
    spec = {name: {"shards": shards, "augment": {"name": "flip"}, "weight": 1} for name, shards in sources.items()}
    return DataMix.from_dict({"sources": spec}, root)


def truncate(path, keep: float = 0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep) + 100)  # off the 512-byte tar block grid: mid-member, not a clean end


def take(it, n):
    return [next(it) for _ in range(n)]


def shard_of(key: str) -> int:
    return int(key.rsplit("-", 1)[1]) // SHARD_SIZE


def test_shards_deleted_and_truncated_mid_stream_are_skipped(dataset, tmp_path, caplog):
    root = fresh_copy(dataset, tmp_path)
    shards = sorted((root / "set" / "train").glob("*.tar"))
    stream = MixedStream(mix_of(root, {"a": "set/train"}), img_size=16, seed=0, total_samples=10_000,
                         with_keys=True)
    it = iter(stream)
    first = take(it, 3)
    current = {shard_of(s["key"]) for s in first}  # read into memory already: left intact
    others = [p for i, p in enumerate(shards) if i not in current]
    for p in others[::2]:
        p.unlink()
    for p in others[1::2]:
        truncate(p)

    with caplog.at_level(logging.WARNING, logger="distill"):
        rest = take(it, 3 * len(shards) * SHARD_SIZE)  # three passes' worth: every broken shard is met

    assert len(rest) == 3 * len(shards) * SHARD_SIZE
    assert all(s["image"].shape == (3, 16, 16) for s in rest)
    skipped = sum(s["skipped"] for s in first + rest)
    # each pass meets every deleted shard (one error each) and every truncated one (at least one)
    assert skipped >= 2 * len(others)
    assert any("skipping unreadable data" in r.getMessage() for r in caplog.records)
    # the intact shard and the readable head of the truncated ones keep being served
    served = {shard_of(s["key"]) for s in rest}
    assert current & served
    assert served & {shards.index(p) for p in others[1::2]}
    assert not served & {shards.index(p) for p in others[::2]}


def test_source_pointing_at_a_truncated_copy_is_skipped_and_mixing_goes_on(dataset, tmp_path, caplog):
    root = fresh_copy(dataset, tmp_path)
    bad = root / "bad"
    bad.mkdir()
    for p in sorted((root / "set" / "train").glob("*.tar"))[:2]:
        shutil.copy(p, bad / p.name)
        truncate(bad / p.name, keep=0.3)
    stream = MixedStream(mix_of(root, {"good": "set/train", "cut": "bad"}), img_size=16, seed=0,
                         total_samples=10_000)
    with caplog.at_level(logging.WARNING, logger="distill"):
        got = take(iter(stream), 200)

    sources = [s["source"] for s in got]
    assert sources.count(0) > 50 and sources.count(1) > 50  # the cut source still gives its readable head
    assert sum(s["skipped"] for s in got) > 0
    assert any("skipping unreadable data" in r.getMessage() for r in caplog.records)


def test_shard_truncated_to_nothing_mid_stream_is_skipped(dataset, tmp_path):
    """A shard emptied after the stream resolved it (e.g. a failed copy): read as zero samples plus an error,
    while the other shards go on."""
    root = fresh_copy(dataset, tmp_path)
    shards = sorted((root / "set" / "train").glob("*.tar"))
    stream = MixedStream(mix_of(root, {"a": "set/train"}), img_size=16, seed=0, total_samples=10_000,
                         with_keys=True)
    it = iter(stream)
    current = shard_of(next(it)["key"])
    victim = shards[(current + 1) % len(shards)]
    victim.write_bytes(b"not a tar archive " * 3)  # shorter than one tar header
    got = take(it, 2 * len(shards) * SHARD_SIZE)
    assert {shard_of(s["key"]) for s in got} == set(range(len(shards))) - {shards.index(victim)}
    assert sum(s["skipped"] for s in got) >= 1
