"""RT-DETR fine-tuning as a small cluster: 2 gloo processes x 2 loader workers, gradient accumulation, more
processes than validation images, a training set that does not split evenly, a SIGKILL, a scheduler's stop
signal, and resumes that must end bitwise equal to the run never stopped; and the host waits for the device once
per micro-batch at most."""
from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import psutil
import pytest
import torch
from launches import finish, kill_after, ranks, signal_tree, stopped_at, sync_calls, torchrun, wait_for_step

from distill.data.synthetic_coco import generate_coco_shapes
from distill.engine.checkpoint import list_checkpoints, load_checkpoint
from distill.engine.preemption import EXIT_REQUEUE

ROOT = Path(__file__).resolve().parent.parent
FINETUNE = str(ROOT / "distill" / "finetune_det.py")
PROCESSES, STEPS = 2, 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("det_cluster")
    generate_coco_shapes(root / "shapes", num_train=13, num_val=1, img_size=96, num_classes=3, max_objects=3, seed=1)
    (root / "tiny.yaml").write_text(
        "model: {backbone: test_efficientnet, hidden_dim: 32, dim_feedforward: 64, num_heads: 2, num_queries: 20,\n"
        "        num_decoder_layers: 2, num_points: 2, num_denoising: 10, dropout: 0.1}\n"
        f"data: {{root: {root / 'shapes'}, train_images: train/images, train_ann: train/annotations.json,\n"
        "       val_images: val/images, val_ann: val/annotations.json, img_size: 96, multiscale: [64, 96],\n"
        "       batch_size: 2, val_batch_size: 2, num_workers: 2}\n"
        "optim: {lr: 0.001, backbone_lr: 0.0005, warmup_steps: 2, clip_grad: 1.0, grad_accum: 2}\n"
        f"train: {{steps: {STEPS}, ckpt_every: 2, keep_ckpts: 10, log_every: 3, ema_decay: 0.9, precision: 'no',\n"
        "        trackers: [jsonl]}\n"
        "eval: {visualize: 0}\n"
    )
    return root


def launch(world, out: Path, *args):
    return torchrun(FINETUNE, PROCESSES, out, f"recipe={world / 'tiny.yaml'}", *args)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("det_reference") / "run"
    finish(launch(world, out), out)
    return out


def test_two_processes_evaluate_one_image_and_draw_their_own_randomness(reference):
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["metrics"]["eval_images"] == 1  # a process without an image
    assert len(set(summary["process_weight_checksums"])) == 1 and len(summary["process_weight_checksums"]) == 2
    states = load_checkpoint(list_checkpoints(reference)[-1])["rng"]
    assert len({bytes(s["torch"].numpy()) for s in states}) == PROCESSES


def test_killed_and_resumed_ends_bitwise_equal(world, reference, tmp_path):
    out = tmp_path / "killed"
    kill_at = kill_after(launch(world, out), out, random.Random().choice([2, 4]))
    finish(launch(world, out, "resume=auto"), out)

    a, b = (load_checkpoint(list_checkpoints(run)[-1]) for run in (reference, out))
    for part in ("model", "ema"):
        differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not differ, (kill_at, part, differ[:5])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa), kill_at


def test_stopped_by_the_scheduler_exits_for_requeue_and_resumes_bitwise_equal(world, reference, tmp_path):
    """Started as srun starts them (a process per rank, no launcher), SIGUSR1 on every process and loader worker at
    a random step: each process exits with the requeue status after a checkpoint at the step they agreed on."""
    out, log = tmp_path / "stopped", Path(f"{tmp_path / 'stopped'}.log")
    procs = ranks(FINETUNE, PROCESSES, out, f"recipe={world / 'tiny.yaml'}", "train.ckpt_every=1000",
                  "train.log_every=1")
    wait_for_step(out / "metrics.jsonl", random.Random().randint(1, STEPS - 3), procs, log)
    for proc in procs:
        signal_tree(psutil.Process(proc.pid), signal.SIGUSR1)
    assert [proc.wait(timeout=120) for proc in procs] == [EXIT_REQUEUE] * PROCESSES, log.read_text()[-3000:]
    step = stopped_at(log)
    assert [p.name for p in list_checkpoints(out)] == [f"ckpt-{step:08d}.pt"] and step < STEPS
    finish(launch(world, out, "resume=auto", "train.ckpt_every=1000", "train.log_every=1"), out)

    a, b = (load_checkpoint(list_checkpoints(run)[-1]) for run in (reference, out))
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (step, part)


def test_the_step_waits_for_the_device_once_per_micro_batch(world, tmp_path, monkeypatch):
    """Calls that make the host wait for a GPU, counted inside each optimizer step by where they come from:
    only the matcher's one transfer of the batch's cost matrices (and reading that host copy) may appear."""
    import distill.finetune_det as finetune
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    with sync_calls(monkeypatch, finetune, "detection_step") as calls:
        finetune.main([f"recipe={world / 'tiny.yaml'}", f"output_dir={tmp_path / 'run'}", "train.steps=3",
                       "data.num_workers=0"])
    assert len(calls) == 3
    for step_calls in calls:
        assert {(where, fn) for _, where, fn in step_calls} <= {("matcher.py", "match_all")}, step_calls
        assert [name for name, _, _ in step_calls].count("cpu") == 2  # grad_accum 2: once per micro-batch
