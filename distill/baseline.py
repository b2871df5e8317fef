"""A baseline beside a distilled run, and the run's closing lines.

`baseline=labels` trains the same student with the same steps, data, batch and seed after the distilled run,
without a teacher (`distill.config.BASELINES` says which keys change), in `<run>/baseline/`, a run folder of its
own. Its top-1 joins the distilled run's summary as `baseline_top1`. With `resume=auto` the launch continues
where it stopped: a distilled run that had finished is only evaluated again, then the baseline resumes from its
own newest checkpoint.

A launch of one process on a machine without CUDA and with two cores or more trains the baseline beside the
distilled run, in a second process, each with half the cores: the two runs share nothing but the data on disk,
so the weights are those the baseline would reach after the distilled run, and a small CPU run (the demo) does
not leave a core idle for half its time. A stop signal stops both at their own step, each with its checkpoint;
the second process also stops when the first ends for any reason.
"""
from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Callable, Optional

from accelerate import PartialState
from omegaconf import DictConfig, OmegaConf

from distill.config import BASELINES
from distill.engine.checkpoint import atomic_write_text
from distill.engine.run_dir import BASELINE_DIR
from distill.errors import EXIT_REQUEUE, LaunchError, Preempted

logger = logging.getLogger("distill")


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


def trains_beside(cfg: DictConfig) -> bool:
    """Whether this launch trains its baseline beside the distilled run (see the module's doc)."""
    import torch

    from distill.engine.threads import usable_cores

    return (bool(cfg.baseline) and PartialState().num_processes == 1 and not torch.cuda.is_available()
            and usable_cores() >= 2)


def stop_signal(cfg: DictConfig) -> signal.Signals:
    """The signal that stops a run at its step with a checkpoint: the first of `cluster.stop_signals`."""
    return signal.Signals[cfg.cluster.stop_signals[0]] if cfg.cluster.stop_signals else signal.SIGTERM


class Beside:
    """The baseline's run in a second process (spawned: a fresh interpreter, none of this one's state)."""

    def __init__(self, cfg: DictConfig, target: Callable[[DictConfig], None]):
        """`target(cfg)` trains the baseline in the second process (`distill.pretrain.train_beside`)."""
        import multiprocessing

        self.folder = Path(cfg.output_dir)
        self.signal = stop_signal(cfg)
        self.process = multiprocessing.get_context("spawn").Process(target=target, args=(cfg,),
                                                                    name="baseline", daemon=False)
        self.process.start()

    def result(self) -> dict:
        """The baseline's summary, once its process has ended; its stop or failure as this process's."""
        from distill.engine.preemption import STOP

        logger.info("the baseline beside the distilled run, in a second process (%s)%s", self.folder,
                    ": waiting for it" if self.process.is_alive() else "")
        forwarded = False
        while self.process.is_alive():  # a stop signal that reaches this process while it waits stops the baseline
            self.process.join(0.2)
            if STOP.received is not None and not forwarded:
                os.kill(self.process.pid, self.signal)
                forwarded = True
        code = self.process.exitcode
        if code == EXIT_REQUEUE or (forwarded and code == -self.signal):  # also stopped before its handlers were set
            raise Preempted(f"the baseline beside the distilled run stopped on a signal ({self.folder})")
        if code != 0:
            raise LaunchError(f"the baseline beside the distilled run ({self.folder}) ended with exit status {code}; "
                              f"its error is printed above")
        return json.loads((self.folder / "summary.json").read_text())

    def stop(self, timeout_s: Optional[float] = None) -> None:
        """This launch ends early: the baseline stops at its step with a checkpoint, as on a stop signal."""
        if self.process.is_alive():
            os.kill(self.process.pid, self.signal)
            self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()


def end_with_parent(cfg: DictConfig) -> None:
    """In the second process: its stop signal arrives when the launch's process ends, however it ends."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    _end_with_parent(stop_signal(cfg), parent.pid if parent else os.getppid())


def _end_with_parent(stop: signal.Signals, parent: int) -> None:
    """Linux: `stop` reaches this process when its parent (pid `parent`) ends, however it ends (even SIGKILL);
    also when it ended already, while this process was starting, before the request could be made."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(stop))
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # adopted: the parent is gone and the request above comes too late
        os.kill(os.getpid(), stop)


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
