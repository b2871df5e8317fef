"""The demo as three gloo processes stops on a scheduler's signals where they agree, and resumes exactly."""
from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import torch
from launches import finish, signal_tree, stopped_at, torchrun, wait_for_step, workers

from distill.data.synthetic import ensure_demo_dataset
from distill.engine.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = str(ROOT / "distill" / "pretrain.py")
STEPS = 16  # the demo, shortened


def test_a_launch_stopped_by_signals_checkpoints_where_it_stopped_and_resumes_to_the_same_weights(tmp_path):
    """Three gloo processes. SIGTERM reaches one process only, at a random step of the distillation: every
    process stops at one step, a checkpoint is written there (there is no periodic one) and the launch ends by
    itself. Resumed, it gets SIGUSR1 on every process and loader worker at a random step of the baseline, and
    stops the same way. Resumed again, distilled and baseline weights end bitwise equal to a launch never
    stopped."""
    ensure_demo_dataset(tmp_path / "data" / "demo")
    # 200 of the 500 validation images: the launches' top-1s only need to agree
    args = ["recipe=demo", f"data.root={tmp_path / 'data'}", f"train.steps={STEPS}", "train.ckpt_every=1000",
            "train.log_every=1", "teacher.fit_steps=4", "data.batch_size=8", "data.num_workers=1",
            "train.trackers=[jsonl]", "data.val_shards=demo/val/shard-{000000..000001}.tar"]
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
