"""A run's folder holds one run. A new run never appends to, overwrites or prunes another run's files.

- `resume=auto` continues the run in the folder (or starts it, when it holds no checkpoint yet);
- `overwrite=true` deletes the earlier run's files (only those a run writes) and starts afresh;
- otherwise a folder holding a run is refused when the user named it, and the default folder
  (`runs/<recipe>`) moves on to `runs/<recipe>-2`, `-3`, ... so that trying a recipe twice just works.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

from distill.errors import ConfigError
from distill.engine.checkpoint import CKPT_PATTERN
from distill.engine.distributed import broadcast_from_main

logger = logging.getLogger("distill")

RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "teacher.pt", "predictions.json", "predictions.png",
             "best.pt", "last.pt", "curves.png", "pr_curves.png")
RUN_GLOBS = ("ckpt-*.pt", "keys-rank*.tsv", ".ckpt-*.tmp", ".best.pt.*.tmp", ".last.pt.*.tmp")
TRACKER_DIRS = ("distill",)  # tensorboard event folders (the trackers' project name)
BASELINE_DIR = "baseline"  # a labels-only run beside the distilled one (pretrain's `baseline` key)


def run_files(folder: Path) -> list[Path]:
    """The files and tracker folders an earlier run left in `folder`."""
    if not folder.is_dir():
        return []
    found = [folder / n for n in RUN_FILES + TRACKER_DIRS + (BASELINE_DIR,) if (folder / n).exists()]
    for pattern in RUN_GLOBS:
        found += sorted(folder.glob(pattern))
    return found


def _holds_run(folder: Path) -> bool:
    markers = ("config.yaml", "summary.json", "metrics.jsonl", BASELINE_DIR)
    return any(p.name in markers or CKPT_PATTERN.search(p.name) for p in run_files(folder))


def _numbered(default: Path) -> list[Path]:
    """`default` and its numbered siblings `default-2`, `default-3`, ... that exist, in order."""
    siblings = [(int(p.name.rsplit("-", 1)[1]), p) for p in default.parent.glob(default.name + "-*")
                if p.name.rsplit("-", 1)[1].isdigit()]
    return ([default] if default.exists() else []) + [p for _, p in sorted(siblings)]


def choose_run_dir(output_dir: Optional[str], default: Path, resume: Optional[str], overwrite: bool) -> Path:
    """The folder this run writes to (decided on the main process, the same on every process)."""

    def decide() -> tuple[str, str]:
        folder = Path(output_dir) if output_dir else default
        if resume:
            if resume == "auto" and not output_dir and _numbered(default):
                folder = _numbered(default)[-1]  # the newest run of this recipe
            return str(folder), ""
        if not _holds_run(folder):
            return str(folder), ""
        if overwrite:
            for path in run_files(folder):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            return str(folder), f"overwrite=true: removed the earlier run's files from {folder}"
        if output_dir:
            return "", (f"{folder} holds an earlier run ({', '.join(sorted({p.name for p in run_files(folder)})[:4])}"
                        f", ...); continue it with resume=auto, replace it with overwrite=true, or write this run "
                        f"elsewhere with output_dir=PATH")
        n = 2
        while _holds_run(default.with_name(f"{default.name}-{n}")):
            n += 1
        fresh = default.with_name(f"{default.name}-{n}")
        return str(fresh), f"{folder} holds an earlier run: this run writes to {fresh} (resume=auto continues the newest)"

    from accelerate import PartialState

    state = PartialState()
    decision = None
    if state.is_main_process:
        try:
            decision = decide()
        except OSError as exc:  # shared with the other processes, which would otherwise wait for an answer
            decision = ("", f"output folder: {exc}")
    folder, note = broadcast_from_main(decision)
    if not folder:
        raise ConfigError(note)
    if note and state.is_main_process:
        logger.warning(note)
    return Path(folder)
