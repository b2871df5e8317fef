"""The pretraining entry point as a small cluster: several gloo processes on the CPU with the hard cases at once.

4 processes x 2 loader workers, more processes than validation shards, a training set whose samples do not
split evenly over the readers, gradient accumulation, logits and feature maps distilled together (the projection
heads are trained and checkpointed state too), compile (the cheap `eager` backend), SIGKILLs at random
checkpoints and resumes, with and without compile. The interrupted run must end bitwise equal to the
uninterrupted one, its tallies must not grow at a resume, and its evaluation must count every validation
sample once.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from launches import finish, kill_after, torchrun

from distill.data.loader import build_eval_loader
from distill.data.synthetic import generate_classification
from distill.engine.checkpoint import atomic_save, list_checkpoints, load_checkpoint
from distill.models.factory import create_model
from distill.models.projection import HEADS, without_projection_heads

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = str(ROOT / "distill" / "pretrain.py")
PROCESSES, STEPS, CKPT_EVERY = 4, 12, 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    # 246 training samples in 7 shards: 246 / (4 processes x 2 workers) is not whole; 36 validation samples
    # in one shard for 4 processes
    generate_classification(root / "shapes", num_classes=6, train_per_class=41, val_per_class=6, img_size=24,
                            seed=0, shard_size=37)
    (root / "mix.yaml").write_text(
        "sources:\n"
        "  strong: {shards: shapes/train, augment: {name: inception_randaug, num_ops: 2, magnitude: 9}}\n"
        "  mixed: {shards: shapes/train, augment: {name: inception}, mixup: true}\n"
        "schedule:\n  - {at: 0.0, weights: {strong: 3, mixed: 1}}\n  - {at: 1.0, weights: {strong: 1, mixed: 3}}\n"
    )
    teacher = create_model("test_resnet", num_classes=6)
    atomic_save({"model": teacher.state_dict()}, root / "teacher.pt")
    (root / "base.yaml").write_text(
        f"student: {{name: test_resnet, num_classes: 6, drop_rate: 0.3}}\n"
        f"teacher: {{name: test_resnet, pretrained: false, checkpoint: {root / 'teacher.pt'}, features: [2, 3]}}\n"
        f"data: {{mix: {root / 'mix.yaml'}, root: {root}, img_size: 24, batch_size: 4, num_workers: 2,\n"
        f"        val_shards: shapes/val, val_batch_size: 5}}\n"
        f"optim: {{lr: 0.003, warmup_steps: 2, clip_grad: 5.0, grad_accum: 2}}\n"
        f"loss: {{ce_weight: 0.5, feature_weight: 0.5}}\n"
        f"feature: {{strides: [8, 16]}}\n"
        f"train: {{steps: {STEPS}, log_every: 3, ckpt_every: {CKPT_EVERY}, keep_ckpts: 3, ema_decay: 0.9,\n"
        f"         trackers: [jsonl]}}\n"
    )
    return root


def launch(cluster, out: Path, *args: str):
    return torchrun(PRETRAIN, PROCESSES, out, f"recipe={cluster / 'base.yaml'}", *args)


def final(out: Path) -> dict:
    return load_checkpoint(list_checkpoints(out)[-1])


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    finish(launch(cluster, out), out)
    return out


def test_one_run_of_four_processes_each_with_its_own_random_stream(reference):
    summary = json.loads((reference / "summary.json").read_text())
    assert len(summary["process_weight_checksums"]) == PROCESSES  # one run, not four copies
    assert len(set(summary["process_weight_checksums"])) == 1
    assert summary["samples"] == STEPS * PROCESSES * 2 * 4 == sum(summary["source_counts"].values())
    states = final(reference)["processes"]
    draws = {bytes(s["rng"]["torch"].numpy()) for s in states}
    assert len(draws) == PROCESSES  # dropout and mixup draw differently on every process
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["feature"] > 0 for r in records if "feature" in r] == [True] * (STEPS // 3)  # logged every 3 steps
    assert any(k.startswith(f"{HEADS}.") for k in final(reference)["student"])


def test_evaluation_counts_every_sample_once_with_more_processes_than_shards(cluster, reference):
    summary = json.loads((reference / "summary.json").read_text())
    model = create_model("test_resnet", num_classes=6)
    model.load_state_dict(without_projection_heads(final(reference)["student"]))
    model.eval()
    from distill.models.factory import input_spec
    from distill.models.teacher import InputAdapter

    prepare = InputAdapter(input_spec(model))
    correct = seen = 0
    with torch.no_grad():
        for batch in build_eval_loader("shapes/val", cluster, 24, 0.875, 36, 0):  # one process, every sample
            logits = model(prepare(batch["image"].float() / 255))
            correct += int((logits.argmax(1) == batch["label"]).sum())
            seen += len(batch["label"])
    assert seen == summary["val_samples"] == 36  # every sample once over the 4 x 2 readers
    # the evaluated model is the saved one: each process evaluates with process 0's batch-norm statistics
    assert summary["student_top1"] == pytest.approx(100 * correct / seen)


def test_killed_twice_and_resumed_ends_bitwise_equal(cluster, reference, tmp_path):
    """Killed at random checkpoints, resumed alternately with and without compile: the same weights, EMA,
    optimizer state and tallies as the run that was never stopped."""
    rng = random.Random()
    out = tmp_path / "killed"
    first = rng.choice(range(CKPT_EVERY, STEPS - 2 * CKPT_EVERY + 1, CKPT_EVERY))
    second = rng.choice(range(first + CKPT_EVERY, STEPS - CKPT_EVERY + 1, CKPT_EVERY))
    compiled = ("student.compile=true", "student.compile_backend=eager")
    at = [kill_after(launch(cluster, out, *compiled), out, first)]
    at.append(kill_after(launch(cluster, out, "resume=auto"), out, second))
    finish(launch(cluster, out, "resume=auto", *compiled), out)
    log = Path(f"{out}.log").read_text()
    assert log.count("resumed from") == 2, at  # logged by the main process

    a, b = final(reference), final(out)
    for part in ("student", "ema"):
        assert set(a[part]) == set(b[part])  # plain keys, compiled or not
        differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not differ, (at, part, differ[:5])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa), at
    assert a["progress"] == b["progress"]
    assert [p["source_counts"] for p in a["processes"]] == [p["source_counts"] for p in b["processes"]], at
    sa, sb = (json.loads((run / "summary.json").read_text()) for run in (reference, out))
    assert sa["source_counts"] == sb["source_counts"] and sa["skipped_samples"] == sb["skipped_samples"]
    assert sa["student_top1"] == sb["student_top1"]


FAULTY = str(Path(__file__).resolve().parent / "faulty_pretrain.py")


def faulty_launch(cluster, out: Path, faults: dict, *args: str):
    """Three processes of the cluster's run with the faults of tests/faulty_pretrain.py and a 4 s timeout. A
    process still there 3 s after another failed is killed (the one that never arrives sleeps for an hour)."""
    os.environ.update(faults)
    try:
        return torchrun(FAULTY, 3, out, f"recipe={cluster / 'base.yaml'}", "cluster.timeout_s=4", *args, grace=3)
    finally:
        for key in faults:
            del os.environ[key]


def test_a_slow_checkpoint_write_holds_no_other_process(cluster, tmp_path):
    """The main process takes 6 s to write each checkpoint, beyond the 4 s the others may wait in a collective:
    the run goes on while the step-6 file is written (every step sleeps 1.5 s: 6 steps > 6 s), and evaluates while
    the last one is."""
    out = tmp_path / "slow"
    finish(faulty_launch(cluster, out, {"SLOW_CHECKPOINT_S": "6", "STEP_SLEEP_S": "1.5"}, "train.ckpt_every=6"), out)
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS == 12
    assert [p.name for p in list_checkpoints(out)] == ["ckpt-00000006.pt", "ckpt-00000012.pt"]


def test_a_process_that_never_arrives_is_named_within_the_timeout(cluster, tmp_path):
    out = tmp_path / "absent"
    launch = faulty_launch(cluster, out, {"ABSENT_RANK": "2", "ABSENT_BATCH": "4"})  # 2 micro-batches a step
    assert launch.wait(timeout=300) != 0
    errors = [line for line in Path(f"{out}.log").read_text().splitlines() if line.startswith("error: ")]
    assert errors, Path(f"{out}.log").read_text()[-3000:]
    for line in errors:  # process 2 has the data of steps 1 and 2 only
        assert "step 3" in line and "cluster.timeout_s=4" in line, line
        assert "never arrived at step 3: process 2 (last ready for step 2)" in line, line
