"""A baseline beside a distilled run, and the run's closing lines.

`baseline=labels` trains the same student with the same steps, data, batch and seed after the distilled run,
without a teacher (`distill.config.BASELINES` says which keys change), in `<run>/baseline/`, a run folder of its
own. Its top-1 joins the distilled run's summary as `baseline_top1`. With `resume=auto` the launch continues
where it stopped: a distilled run that had finished is only evaluated again, then the baseline resumes from its
own newest checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf

from distill.config import BASELINES
from distill.engine.checkpoint import atomic_write_text
from distill.engine.run_dir import BASELINE_DIR


def baseline_config(cfg: DictConfig) -> DictConfig:
    """The baseline's configuration: the distilled run's (after it chose its folder), with the baseline's keys."""
    base = cfg.copy()
    for key, value in BASELINES[cfg.baseline].items():
        OmegaConf.update(base, key, value)
    base.baseline = None
    base.output_dir = str(Path(cfg.output_dir) / BASELINE_DIR)
    base.resume = "auto" if cfg.resume else None
    base.overwrite = False  # the distilled run's folder was chosen fresh or emptied, the baseline's with it
    return base


def add_baseline(cfg: DictConfig, summary: dict, baseline: dict) -> dict:
    """The distilled run's summary with the baseline's top-1 added (and written again)."""
    summary = {**summary, "baseline": cfg.baseline, "baseline_top1": baseline["student_top1"],
               "baseline_ema_top1": baseline["student_ema_top1"]}
    if PartialState().is_main_process:
        atomic_write_text(Path(cfg.output_dir) / "summary.json", json.dumps(summary, indent=2))
    return summary


def print_outcome(cfg: DictConfig, summary: dict) -> None:
    """The run's outcome as its last lines (main process): the teacher's top-1, the student's and, with one, the
    baseline's. Students are given by their EMA weights, the ones a run hands off (`distill.export`)."""
    if not PartialState().is_main_process:
        return
    teacher, student = summary.get("teacher_top1"), summary["student_ema_top1"]
    how = "distilled" if cfg.loss.kd_weight else "feature maps only" if cfg.loss.feature_weight else "labels only"
    if trend := summary.get("feature_loss"):
        print(f"feature   {cfg.loss.feature_loss} loss {trend['first']:.3f} at step {trend['first_step']} -> "
              f"{trend['last']:.3f} at step {trend['last_step']}", flush=True)
    if student is None:  # no data.val_shards (a feature-only run trains no classifier)
        print(f"student   {cfg.student.name}, {how}: no top-1 measured (data.val_shards is not set); "
              f"the losses are in {Path(cfg.output_dir) / 'metrics.jsonl'}", flush=True)
        return
    rows = [("teacher", cfg.teacher.name, teacher, "")] if teacher is not None else []
    rows.append(("student", f"{cfg.student.name}, {how}", student,
                 f"(EMA weights; {student / teacher:.1%} of the teacher)" if teacher else "(EMA weights)"))
    if summary.get("baseline_ema_top1") is not None:
        rows.append(("baseline", f"{cfg.student.name}, {cfg.baseline} only", summary["baseline_ema_top1"],
                     "(EMA weights; same steps, data and batch)"))
    width = max(len(model) for _, model, _, _ in rows)
    print("\n".join(f"{role:<9} {model:<{width}}  {top1:5.1f}% top-1  {note}".rstrip()
                    for role, model, top1, note in rows), flush=True)
