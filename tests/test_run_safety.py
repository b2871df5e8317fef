"""A run's folder, its files and what it loads: one run per folder, no code run from a checkpoint, files a
team can read, no host sync in the training step, and each pass of the data served once."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import cv2
import pytest
import torch
from launches import sync_calls

import distill.pretrain as pretrain
from distill.data.mix import DataMix
from distill.data.loader import build_train_loader
from distill.data.stream import MixedStream
from distill.data.synthetic import generate_classification
from distill.engine.checkpoint import atomic_save, checkpoint_path, list_checkpoints, load_checkpoint, prune_checkpoints
from distill.models.factory import create_model

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    generate_classification(root / "shapes", num_classes=NUM_CLASSES, train_per_class=41, val_per_class=5,
                            img_size=16, seed=0, shard_size=37)  # 164 training samples in 5 shards
    (root / "mix.yaml").write_text(
        "sources:\n  a: {shards: shapes/train, augment: {name: inception}}\n"
        "  b: {shards: shapes/train, augment: {name: inception}, mixup: true}\n")
    atomic_save({"model": create_model("test_resnet", num_classes=NUM_CLASSES).state_dict()}, root / "teacher.pt")
    (root / "base.yaml").write_text(
        f"student: {{name: test_resnet, num_classes: {NUM_CLASSES}, drop_rate: 0.1}}\n"
        f"teacher: {{name: test_resnet, pretrained: false, checkpoint: {root / 'teacher.pt'}}}\n"
        f"data: {{mix: {root / 'mix.yaml'}, root: {root}, img_size: 16, batch_size: 4, num_workers: 0,\n"
        f"        val_shards: shapes/val, val_batch_size: 20}}\n"
        f"optim: {{lr: 0.003, warmup_steps: 1}}\n"
        f"train: {{steps: 4, log_every: 2, ckpt_every: 2, trackers: [jsonl]}}\n")
    return root


def run(world, *args):
    return pretrain.main([f"recipe={world / 'base.yaml'}", *args])


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_named_folder_holding_a_run_is_refused_then_overwritten_on_request(world, tmp_path, capsys):
    out = tmp_path / "run"
    run(world, f"output_dir={out}")
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as exc:
        run(world, f"output_dir={out}", "train.steps=6")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(out) in err and "resume=auto" in err and "overwrite=true" in err
    assert (out / "metrics.jsonl").read_text() == before and json.loads((out / "summary.json").read_text())["steps"] == 4

    run(world, f"output_dir={out}", "train.steps=6", "overwrite=true")
    assert metric_steps(out) == [2, 4, 6, 6]  # the new run's records only (the last step logs its evaluation too)
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_the_default_folder_moves_on_and_resume_continues_the_newest(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(world)
    run(world, "train.steps=6")
    first, second = tmp_path / "runs" / "base", tmp_path / "runs" / "base-2"
    assert json.loads((first / "summary.json").read_text())["steps"] == 4
    assert json.loads((second / "summary.json").read_text())["steps"] == 6
    run(world, "train.steps=8", "resume=auto")  # continues runs/base-2, the newest
    assert json.loads((second / "summary.json").read_text())["steps"] == 8
    assert not (tmp_path / "runs" / "base-3").exists()


def test_the_checkpoint_just_written_is_never_pruned(tmp_path):
    atomic_save({"step": 900}, checkpoint_path(tmp_path, 900))  # a stale file with a higher step
    path = checkpoint_path(tmp_path, 5)
    atomic_save({"step": 5}, path)
    prune_checkpoints(tmp_path, keep=1, just_written=path)
    assert path.exists()


def test_written_files_are_readable_by_the_team(world, tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        run(world, f"output_dir={out}")
    finally:
        os.umask(old)
    for path in [*list_checkpoints(out), out / "summary.json", out / "config.yaml"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_a_teacher_fitted_under_other_settings_is_fitted_again(world, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    atomic_save({"model": create_model("test_resnet", num_classes=NUM_CLASSES).state_dict(),
                 "fingerprint": {"fit_steps": 999}}, out / "teacher.pt")
    run(world, f"output_dir={out}", "teacher.checkpoint=null", "teacher.fit_steps=3", "train.steps=2")
    assert "fitted with other settings" in caplog.text
    assert load_checkpoint(out / "teacher.pt")["fingerprint"]["fit_steps"] == 3


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("role", ["teacher", "resume"])
def test_a_checkpoint_that_would_run_code_is_refused_by_name(world, tmp_path, capsys, role):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {}, "student": {}, "extra": _Payload(marker)}, evil)
    arg = f"teacher.checkpoint={evil}" if role == "teacher" else f"resume={evil}"
    with pytest.raises(SystemExit) as exc:
        run(world, f"output_dir={tmp_path / 'run'}", arg)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and str(evil) in err
    assert not marker.exists()


def test_the_training_step_waits_for_the_device_never(world, tmp_path, monkeypatch):
    """Calls that make the host wait for a GPU, counted inside each optimizer step of the real loop."""
    with sync_calls(monkeypatch, pretrain, "distill_step") as calls:
        run(world, f"output_dir={tmp_path / 'run'}", "optim.grad_accum=2", "optim.clip_grad=1.0",
            "loss.ce_weight=0.5")
    assert calls == [[], [], [], []]


def test_loader_processes_run_opencv_on_one_thread(world):
    cv2.setNumThreads(4)
    mix = DataMix.load(world / "mix.yaml", world)
    loader = build_train_loader(mix, 16, batch_size=2, num_workers=1, seed=0, total_samples=100)
    next(iter(loader))
    assert cv2.getNumThreads() == 1  # set before the workers fork, so they inherit it


def test_each_pass_serves_every_sample_once_when_the_split_is_uneven(world):
    """164 samples in 5 shards over 8 readers (4 processes x 2 workers, say): shares of 20 or 21 samples."""
    mix = DataMix.from_dict({"sources": {"a": {"shards": "shapes/train", "augment": "flip"}}}, world)
    readers, total = 8, 164
    passes = [[], []]
    for reader in range(readers):
        share = (reader + 1) * total // readers - reader * total // readers
        it = iter(MixedStream(mix, 16, seed=3, total_samples=10**6, rank=reader, world_size=readers,
                              with_keys=True))
        for p in passes:
            p += [next(it)["key"] for _ in range(share)]
    for keys in passes:
        assert len(keys) == total and len(set(keys)) == total
    assert passes[0] != passes[1]
