"""End-to-end pretraining runs on generated data, as a user launches them (subprocesses)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import launches
import pytest
import torch

from distill.config import BASELINES
from distill.data.synthetic import generate_classification
from distill.engine.checkpoint import atomic_save, list_checkpoints
from distill.errors import EXIT_REQUEUE
from distill.models.factory import create_model

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = str(ROOT / "distill" / "pretrain.py")
NUM_CLASSES = 6


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Generated shards, a two-source mix over them and a base recipe, shared by every run here."""
    root = tmp_path_factory.mktemp("pretrain")
    generate_classification(root / "shapes", num_classes=NUM_CLASSES, train_per_class=120, val_per_class=40,
                            img_size=32, seed=0, shard_size=60)
    (root / "mix.yaml").write_text(
        "sources:\n"
        "  strong: {shards: shapes/train, augment: {name: inception_randaug, num_ops: 2, magnitude: 9}, weight: 1}\n"
        "  mixed: {shards: shapes/train, augment: {name: inception}, mixup: true, weight: 1}\n"
    )
    (root / "base.yaml").write_text(
        f"""
student: {{name: test_resnet, num_classes: {NUM_CLASSES}}}
teacher: {{name: test_resnet, pretrained: false, fit_steps: 0}}
data: {{mix: {root / 'mix.yaml'}, root: {root}, img_size: 32, batch_size: 16, num_workers: 1,
        val_shards: shapes/val, val_batch_size: 120}}
optim: {{lr: 0.003, weight_decay: 0.01, warmup_steps: 5, clip_grad: 5.0}}
train: {{steps: 20, log_every: 5, ckpt_every: 10, ema_decay: 0.9, trackers: [jsonl]}}
"""
    )
    return root


def run(world, out: Path, *args: str, launcher=(sys.executable,), check=True, background=False, env=None):
    argv = [f"recipe={world / 'base.yaml'}", f"output_dir={out}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if background:
        out.mkdir(parents=True, exist_ok=True)
        return launches.WARM.start(PRETRAIN, argv, env, out.parent / f"{out.name}.log")
    if launcher == (sys.executable,):  # one process, forked from the warm interpreter
        proc = launches.run(PRETRAIN, *argv, env=env)
    else:
        proc = subprocess.run([*launcher, PRETRAIN, *argv], env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="session")
def teacher_ckpt(world, tmp_path_factory):
    """A teacher trained on the labels by the pipeline's own `teacher.fit_steps` path."""
    out = tmp_path_factory.mktemp("teacher_run")
    run(world, out, "teacher.fit_steps=300", "train.steps=1")
    assert (out / "teacher.pt").exists()
    return out / "teacher.pt"


def test_run_writes_its_folder_and_follows_the_mix(world, teacher_ckpt, tmp_path):
    out = tmp_path / "run"
    run(world, out, f"teacher.checkpoint={teacher_ckpt}")
    s = summary(out)
    for key in ("recipe", "steps", "teacher_top1", "student_top1", "student_ema_top1"):
        assert key in s
    assert s["steps"] == 20 and s["samples"] == 20 * 16
    assert (out / "config.yaml").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shares = [r["share/strong"] for r in records if "share/strong" in r]
    assert shares and 0.2 < shares[-1] < 0.8
    assert sum(s["source_counts"].values()) == 20 * 16
    assert [p.name for p in list_checkpoints(out)] == ["ckpt-00000010.pt", "ckpt-00000020.pt"]


def test_kill_and_resume_finishes_with_the_same_steps(world, teacher_ckpt, tmp_path):
    out = tmp_path / "killed"
    args = [f"teacher.checkpoint={teacher_ckpt}", "train.steps=40", "train.ckpt_every=10", "train.keep_ckpts=5"]
    proc = run(world, out, *args, background=True)
    deadline = time.time() + 600
    while not list_checkpoints(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list_checkpoints(out), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    last = int(list_checkpoints(out)[-1].stem.split("-")[1])
    assert last < 40
    resumed = run(world, out, *args, "resume=auto")
    assert "resumed from" in resumed.stdout + resumed.stderr
    s = summary(out)
    assert s["steps"] == 40 and s["samples"] == 40 * 16
    ckpt = torch.load(list_checkpoints(out)[-1], weights_only=False)
    assert ckpt["progress"]["step"] == 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_gloo_stay_in_sync(world, teacher_ckpt, tmp_path):
    out = tmp_path / "ddp"
    # two CPU processes over gloo: torchrun starts them, Accelerate picks the world up from its variables
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port()))
    run(world, out, f"teacher.checkpoint={teacher_ckpt}", "train.steps=10", "data.batch_size=8",
        "data.record_keys=true", launcher=launcher, env={"ACCELERATE_USE_CPU": "true"})
    seen = [set((out / f"keys-rank{r}.tsv").read_text().splitlines()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 10 * 8  # less than one pass per source: nothing repeats
    assert not seen[0] & seen[1]  # no (source, sample) trained on by both processes
    s = summary(out)
    assert len(s["process_weight_checksums"]) == 2
    assert s["process_weight_checksums"][0] == pytest.approx(s["process_weight_checksums"][1], rel=1e-9)
    assert s["samples"] == 10 * 8 * 2 and sum(s["source_counts"].values()) == 10 * 8 * 2


def test_class_count_mismatch_is_refused(world, tmp_path):
    m = create_model("test_resnet", num_classes=NUM_CLASSES + 3)
    atomic_save({"model": m.state_dict()}, tmp_path / "t.pt")
    proc = run(world, tmp_path / "x", f"teacher.checkpoint={tmp_path / 't.pt'}", check=False)
    assert proc.returncode != 0
    assert "fc.weight" in proc.stderr and "t.pt" in proc.stderr


def test_missing_shards_and_bad_keys_fail_before_work(world, tmp_path):
    proc = run(world, tmp_path / "x", "optim.lrr=1", check=False)
    assert proc.returncode == 2 and "optim.lrr" in proc.stderr and "warmup_epochs" in proc.stderr
    (tmp_path / "mix.yaml").write_text("sources:\n  a: {shards: nowhere/shard-{000..003}.tar, augment: {name: flip}, weight: 1}\n")
    proc = run(world, tmp_path / "y", f"data.mix={tmp_path / 'mix.yaml'}", check=False)
    assert proc.returncode != 0 and "nowhere" in proc.stderr
    assert not list_checkpoints(tmp_path / "y")


def test_non_finite_losses_are_skipped_counted_then_stop_the_run(world, teacher_ckpt, tmp_path):
    # an absurd learning rate blows the weights up after the first update: every later loss is non-finite
    explode = [f"teacher.checkpoint={teacher_ckpt}", "optim.lr=1e30", "optim.warmup_steps=0", "train.steps=6"]
    run(world, tmp_path / "counted", *explode, "train.max_bad_steps=100")
    s = summary(tmp_path / "counted")
    assert s["steps"] == 6 and s["bad_steps"] >= 4
    proc = run(world, tmp_path / "stopped", *explode, "train.max_bad_steps=3", check=False)
    assert proc.returncode == 2
    assert "non-finite" in proc.stderr and "max_bad_steps=3" in proc.stderr


def test_the_baseline_beside_trains_as_alone_stops_with_the_launch_and_resumes_exactly(world, teacher_ckpt, tmp_path):
    """One process on a CPU machine of two cores or more trains the baseline beside the distilled run, in a second
    process. SIGTERM to the launch's process only (as `kill PID` sends it) stops the baseline too, at its step with
    a checkpoint, and the launch exits for a requeue; resumed, the distilled run ends bitwise equal to one never
    stopped, and the baseline to the same baseline trained on its own."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the baseline trains beside the distilled run on two cores or more")
    steps = ["train.steps=60", "train.ckpt_every=1000", "train.log_every=1"]
    distilled = [f"teacher.checkpoint={teacher_ckpt}", *steps]
    alone, whole, cut = tmp_path / "alone", tmp_path / "whole", tmp_path / "cut"
    run(world, alone, *steps, *(f"{k}={v}" for k, v in BASELINES["labels"].items()))
    run(world, whole, *distilled)

    launch, log = run(world, cut, *distilled, "baseline=labels", background=True), tmp_path / "cut.log"
    launches.wait_for_step(cut / "baseline" / "metrics.jsonl", 2, [launch], log)
    launch.send_signal(signal.SIGTERM)
    assert launch.wait(timeout=300) == EXIT_REQUEUE, log.read_text()[-3000:]
    stopped = [int(p.stem.split("-")[1]) for p in list_checkpoints(cut / "baseline")]
    assert len(stopped) == 1 and stopped[0] < 60, stopped
    done = run(world, cut, *distilled, "baseline=labels", "resume=auto")
    assert "baseline beside the distilled run, in a second process" in done.stdout + done.stderr
    same_weights(whole / "ckpt-00000060.pt", cut / "ckpt-00000060.pt")
    same_weights(alone / "ckpt-00000060.pt", cut / "baseline" / "ckpt-00000060.pt")
    assert summary(cut)["baseline_ema_top1"] == summary(alone)["student_ema_top1"]


def same_weights(a: Path, b: Path) -> None:
    a, b = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    for part in ("student", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
