"""The embedded demo makes its claim: the distilled student reaches 90% of its teacher's top-1 and beats the same
student trained on labels alone with the same budget. Checked once, on the README's own run (seed 0, the demo's
size and loader workers: shorter runs fell short of 90%); the other seeds of the README's table are measured by
`scripts/demo_seeds.py`. And the demo stops on a scheduler's signals and resumes exactly."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launches import finish, signal_tree, stopped_at, torchrun, wait_for_step, workers

from distill.data.synthetic import ensure_demo_dataset
from distill.engine.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = str(ROOT / "distill" / "pretrain.py")
STEPS = 16  # the signal test's shortened demo


@pytest.mark.slow
def test_the_demo_student_reaches_its_teacher_and_beats_labels_alone(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, PRETRAIN, "recipe=demo", f"output_dir={out}", f"data.root={tmp_path / 'data'}",
           "train.trackers=[jsonl]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # as `accelerate launch` runs it
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # students by their EMA weights, the ones a run hands off
    teacher, student, baseline = summary["teacher_top1"], summary["student_ema_top1"], summary["baseline_ema_top1"]
    assert teacher > 60, summary  # the teacher learned (ten classes: chance is 10%)
    assert student >= 0.9 * teacher, summary
    assert student > max(baseline, summary["baseline_top1"]), summary
    # the run's last lines are the three numbers, in that order
    last = done.stdout.strip().splitlines()[-3:]
    assert [line.split()[0] for line in last] == ["teacher", "student", "baseline"], last
    for line, value in zip(last, (teacher, student, baseline)):
        assert f"{value:.1f}%" in line, last
    # the baseline is the same student with the same budget, and no teacher
    base = json.loads((out / "baseline" / "summary.json").read_text())
    assert base["teacher_top1"] is None and base["steps"] == summary["steps"], base
    assert base["samples"] == summary["samples"], base


def test_a_launch_stopped_by_signals_checkpoints_where_it_stopped_and_resumes_to_the_same_weights(tmp_path):
    """Three gloo processes. SIGTERM reaches one process only, at a random step of the distillation: every
    process stops at one step, a checkpoint is written there (there is no periodic one) and the launch ends by
    itself. Resumed, it gets SIGUSR1 on every process and loader worker at a random step of the baseline, and
    stops the same way. Resumed again, distilled and baseline weights end bitwise equal to a launch never
    stopped."""
    ensure_demo_dataset(tmp_path / "data" / "demo")
    args = ["recipe=demo", f"data.root={tmp_path / 'data'}", f"train.steps={STEPS}", "train.ckpt_every=1000",
            "train.log_every=1", "teacher.fit_steps=4", "data.batch_size=8", "data.num_workers=1",
            "train.trackers=[jsonl]"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    log, rng = Path(f"{cut}.log"), random.Random()
    finish(torchrun(PRETRAIN, 3, whole, *args), whole)

    launch = torchrun(PRETRAIN, 3, cut, *args)
    wait_for_step(cut / "metrics.jsonl", rng.randint(1, STEPS - 4), [launch], log)
    signal_tree(rng.choice(list(workers(launch).values())), signal.SIGTERM)
    assert launch.wait(timeout=120) != 0  # by itself, within torchrun's grace time; status 75 per process
    first = stopped_at(log)
    assert log.read_text().count("stopped on a signal") == 3  # every process stopped; none crashed
    assert [p.name for p in list_checkpoints(cut)] == [f"ckpt-{first:08d}.pt"] and first < STEPS

    launch = torchrun(PRETRAIN, 3, cut, *args, "resume=auto")
    wait_for_step(cut / "baseline" / "metrics.jsonl", rng.randint(1, STEPS - 4), [launch], log)
    for rank in workers(launch).values():
        signal_tree(rank, signal.SIGUSR1)
    assert launch.wait(timeout=120) != 0
    second = int(log.read_text().split("stopped on a signal at step ")[-1].split()[0])
    assert log.read_text().count("stopped on a signal") == 6
    assert [p.name for p in list_checkpoints(cut / "baseline")] == [f"ckpt-{second:08d}.pt"] and second < STEPS

    finish(torchrun(PRETRAIN, 3, cut, *args, "resume=auto"), cut)
    for sub in (f"ckpt-{STEPS:08d}.pt", f"baseline/ckpt-{STEPS:08d}.pt"):
        a = torch.load(whole / sub, weights_only=True)
        b = torch.load(cut / sub, weights_only=True)
        for part in ("student", "ema", "optimizer"):
            assert torch.equal(flat(a[part]), flat(b[part])), (sub, part, first, second)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (whole, cut)]
    assert summaries[0]["baseline_top1"] == summaries[1]["baseline_top1"] is not None


def flat(state) -> torch.Tensor:
    """Every floating-point number of a (nested) state dict, in one vector."""
    if torch.is_tensor(state):
        return state.detach().double().flatten() if state.is_floating_point() else torch.zeros(0, dtype=torch.double)
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else []
    return torch.cat([flat(v) for v in values] or [torch.zeros(0, dtype=torch.double)])
