"""Resuming a run: one checkpoint for every process, chosen by the main process, loaded and checked by all.

Each process choosing for itself could fall back to an older checkpoint on a read error of its own (EIO, ESTALE,
a short read on a network file system) and go on from other weights, another step and another data position than
the rest: DDP does not notice, and the processes hang near the end, when one runs out of steps before the others.
So the main process lists the folder and test-reads the newest file, and hands the others its choice; every
process loads that file, and before anyone goes on they gather whether each one could and at which step it now
stands. A failure anywhere stops every process with the same line instead of a hang.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, TypeVar

from distill.engine.checkpoint import CheckpointMismatch, remove_stale_temps, resolve_resume
from distill.engine.distributed import broadcast_from_main, gather_from_all
from distill.errors import ConfigError

Loaded = TypeVar("Loaded")
logger = logging.getLogger("distill")


def choose_resume(resume: Optional[str], folder: Path) -> Optional[Path]:
    """The checkpoint every process of the run resumes from (None: a fresh start), the main process's choice.

    Every process calls this once, at the start of a run in `folder`, before the run's first checkpoint write:
    the main process first removes the temporary files of writes that a killed process left there (none of
    this run's own writes can be in flight yet)."""
    from accelerate import PartialState

    decision, failure = None, None
    if PartialState().is_main_process:
        try:
            remove_stale_temps(folder)
            chosen = resolve_resume(resume, folder)
            decision = (str(chosen) if chosen else None, None, None)
        except Exception as exc:  # shared, as strings: the others would otherwise wait for an answer
            failure, kind = exc, _kind(exc)
            decision = (None, kind, str(exc) if kind else f"{type(exc).__name__}: {exc}")
    chosen, kind, problem = broadcast_from_main(decision)
    if problem is not None:
        raise SHARED_ERRORS.get(kind, RuntimeError)(problem) from failure
    return Path(chosen) if chosen else None


# the user errors a choice can end in, raised alike on every process: the entry points print them in one line
SHARED_ERRORS = {"OSError": OSError, "CheckpointMismatch": CheckpointMismatch, "ConfigError": ConfigError}


def _kind(exc: Exception) -> Optional[str]:
    """The name in SHARED_ERRORS of the user error `exc` is; None for any other (a bug: RuntimeError)."""
    return next((name for name, kind in SHARED_ERRORS.items() if isinstance(exc, kind)), None)


def load_everywhere(path: Path, load: Callable[[], Loaded], step: Callable[[Loaded], int]) -> Loaded:
    """`load()` (of checkpoint `path`) on every process, returned once all have loaded it and stand at the same
    `step` of the loaded state. Otherwise every process raises CheckpointMismatch with the same line, naming
    the processes that failed or differ; a failure every process shares is raised as it is."""
    loaded, error = None, None
    try:
        loaded = load()
        outcome = (None, step(loaded))
    except Exception as exc:  # shared before anyone raises: the others would wait for ever
        said = str(exc) if isinstance(exc, CheckpointMismatch) else f"{type(exc).__name__}: {exc}"
        error, outcome = exc, (said.replace(str(path), path.name), None)
    outcomes = gather_from_all(outcome)
    if error is not None and len({message for message, _ in outcomes}) == 1:
        raise error  # every process failed alike (a checkpoint of another model or schedule)
    problem = disagreement(path, outcomes)
    if problem:
        raise CheckpointMismatch(problem)
    logger.info("resumed from %s at step %d", path, outcomes[0][1])
    return loaded


def disagreement(path: Path, outcomes: list[tuple[Optional[str], Optional[int]]]) -> Optional[str]:
    """One line on what went wrong with loading `path`, from each process's (error or None, step): None when
    every process loaded it and stands at the same step."""
    failed = [rank for rank, (error, _) in enumerate(outcomes) if error]
    if failed:
        first = outcomes[failed[0]][0].strip().splitlines()[0][:300]
        return (f"{_processes(failed)} of {len(outcomes)} could not load {path} ({first}): every process must "
                f"resume from the same checkpoint, so the run stops; check the file system, or move the file away "
                f"to resume from the one before")
    steps = [step for _, step in outcomes]
    differ = [rank for rank, step in enumerate(steps) if step != steps[0]]
    if differ:
        return (f"after loading {path}, process 0 stands at step {steps[0]} but "
                f"{', '.join(f'process {rank} at step {steps[rank]}' for rank in differ)}: the run stops rather "
                f"than train its processes on from different states")
    return None


def _processes(ranks: list[int]) -> str:
    return f"process {ranks[0]}" if len(ranks) == 1 else f"processes {', '.join(map(str, ranks))}"
