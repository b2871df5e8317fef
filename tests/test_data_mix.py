"""Data mix files: validation, weights and schedules, and the project's own mixes."""
import numpy as np
import pytest

from distill.data.mix import MIX_DIR, DataMix, MixError
from distill.data.synthetic import generate_classification


def write_mix(tmp_path, text: str):
    path = tmp_path / "mix.yaml"
    path.write_text(text)
    return path


GOOD = """
sources:
  a: {shards: set/train, augment: {name: inception_randaug, num_ops: 2, magnitude: 9}, weight: 1}
  b: {shards: set/train, augment: {name: inception}, mixup: true, weight: 3}
"""


def test_weights_without_schedule(tmp_path):
    mix = DataMix.load(write_mix(tmp_path, GOOD), tmp_path)
    assert mix.source_names == ["a", "b"] and mix.mixup_flags == [False, True]
    assert np.allclose(mix.weights_at(0.0), [0.25, 0.75]) and np.allclose(mix.weights_at(0.9), [0.25, 0.75])
    assert mix.source("b").augment == {"name": "inception"}


def test_schedule_is_piecewise_linear_and_clamped(tmp_path):
    mix = DataMix.load(write_mix(tmp_path, GOOD + """
schedule:
  - {at: 0.0, weights: {a: 1, b: 0}}
  - {at: 0.5, weights: {a: 1, b: 1}}
  - {at: 1.0, weights: {a: 0, b: 1}}
"""), tmp_path)
    assert np.allclose(mix.weights_at(0.0), [1, 0])
    assert np.allclose(mix.weights_at(0.25), [2 / 3, 1 / 3])
    assert np.allclose(mix.weights_at(0.5), [0.5, 0.5])
    assert np.allclose(mix.weights_at(1.0), [0, 1]) and np.allclose(mix.weights_at(7.0), [0, 1])
    table = mix.weights_at(np.array([0.0, 0.5, 1.0]))
    assert table.shape == (3, 2) and np.allclose(table.sum(1), 1)


@pytest.mark.parametrize("text, message", [
    (GOOD + "shuffle: true\n", r"\(top level\): unknown keys \['shuffle'\]"),
    (GOOD.replace("weight: 3", "weight: 3, repeat: 2"), r"sources\.b: unknown keys \['repeat'\]"),
    (GOOD.replace("weight: 3", "weight: -1"), r"sources\.b\.weight: weights must be >= 0"),
    (GOOD.replace("weight: 3", "weight: 0").replace("weight: 1", "weight: 0"), "all weights are zero"),
    (GOOD.replace("inception}", "cutmix}"), r"sources\.b\.augment: unknown augmentation preset 'cutmix'"),
    (GOOD.replace("magnitude: 9", "strength: 9"), r"sources\.a\.augment:.*unknown parameters \['strength'\]"),
    (GOOD.replace("mixup: true", "mixup: yes please"), r"sources\.b\.mixup: expected true or false"),
    (GOOD + "schedule:\n  - {at: 0.0, weights: {a: 1, c: 1}}\n",
     r"schedule\[0\]\.weights: unknown sources \['c'\]"),
    (GOOD + "schedule:\n  - {at: 0.0, weights: {a: 1}}\n", r"schedule\[0\]\.weights: no weight for sources \['b'\]"),
    (GOOD + "schedule:\n  - {at: 0.5, weights: {a: 1, b: 1}}\n  - {at: 0.2, weights: {a: 1, b: 1}}\n",
     r"schedule\[1\]\.at: `at` must increase"),
    (GOOD + "schedule:\n  - {at: 0.0, weights: {a: 0, b: 0}}\n", r"schedule\[0\]\.weights: all weights are zero"),
    (GOOD + "schedule:\n  - {at: 1.5, weights: {a: 1, b: 1}}\n", r"schedule\[0\]\.at: expected a training progress"),
    ("sources: {}\n", "sources: expected a non-empty mapping"),
])
def test_invalid_mixes_name_file_and_key(tmp_path, text, message):
    path = write_mix(tmp_path, text)
    with pytest.raises(MixError, match=message) as info:
        DataMix.load(path, tmp_path)
    assert str(path) in str(info.value)


def test_unknown_mix_name_lists_known_ones(tmp_path):
    with pytest.raises(MixError, match=r"no file .*known mixes.*'demo'.*'mnv4'"):
        DataMix.load("mnv5", tmp_path)


def test_project_mixes_load_with_the_papers_ratios(tmp_path):
    mnv4 = DataMix.load("mnv4", tmp_path)
    assert mnv4.path == MIX_DIR / "mnv4.yaml"
    assert mnv4.source_names == ["d1", "d2", "d3"] and mnv4.mixup_flags == [False, True, False]
    assert np.allclose(mnv4.weights_at(0.3), [0.25, 0.25, 0.5])
    assert mnv4.source("d1").augment == {"name": "inception_randaug_tf", "num_ops": 2, "magnitude": 9}
    assert mnv4.source("d3").augment["magnitude"] == 5
    demo = DataMix.load("demo", tmp_path)
    early, late = demo.weights_at(0.0), demo.weights_at(1.0)
    assert early[0] > early[1] and late[0] < late[1]  # the schedule really moves the weights


def test_shards_and_sizes_resolve_against_root(tmp_path):
    generate_classification(tmp_path / "set", num_classes=3, train_per_class=10, val_per_class=2, img_size=16,
                            shard_size=7)
    mix = DataMix.load(write_mix(tmp_path, GOOD), tmp_path)
    assert len(mix.shard_paths("a")) == 5 and mix.num_samples("a") == 30
    missing = DataMix.load(write_mix(tmp_path, GOOD.replace("set/train", '"set/shard-{000000..000003}.tar"')), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"source 'a'.*4 of 4 shards missing"):
        missing.shard_paths("a")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "x.tar").write_bytes((tmp_path / "set/train/shard-000000.tar").read_bytes())
    unsized = DataMix.load(write_mix(tmp_path, GOOD.replace("set/train", "loose")), tmp_path)
    assert unsized.num_samples("a", default=-1) == -1
    with pytest.raises(ValueError, match=r"source 'a': its size is unknown"):
        unsized.num_samples("a")
