"""What a pretraining run must carry across an interruption, and its checkpoint file.

Two kinds of state: the run's (weights, EMA, optimizer, schedule, step counters), the same on every process,
and each process's own (its random generators, its loader workers' positions in the data stream, its tallies
of drawn and skipped samples), gathered into the checkpoint as one entry per process. A run resumed with the
same processes and loader workers continues bitwise as if never stopped.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from distill.engine.checkpoint import (
    CheckpointWriter,
    checkpoint_path,
    load_checkpoint,
    load_state_strict,
)
from distill.engine.rng import capture_rng

logger = logging.getLogger("distill")


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken (skipped non-finite steps included: they consumed data)
    samples: int = 0  # global samples drawn from the mix: the mix schedule's position
    bad_steps: int = 0  # non-finite updates skipped in all
    bad_in_row: int = 0


@dataclass
class ProcessState:
    """One process's share of the run state."""

    source_counts: list[int] = field(default_factory=list)  # samples this process drew from each source
    skipped_samples: int = 0  # corrupt or undecodable samples its loader skipped
    loader: dict = field(default_factory=dict)  # its StatefulDataLoader's state: every worker's position
    loader_shape: list[int] = field(default_factory=list)  # [processes, loader workers] the position is for
    rng: Optional[dict] = None


def save_pretrain_checkpoint(folder, accelerator, student, ema, optimizer, scheduler, progress: Progress,
                             mine: ProcessState, cfg, keep: int, writer: CheckpointWriter) -> None:
    """All processes call this (their states are gathered); the main one hands the checkpoint to `writer`, and
    nobody waits for the disk."""
    from accelerate.utils import gather_object

    mine.rng = capture_rng()
    processes = gather_object([asdict(mine)])
    if accelerator.is_main_process:
        state = {
            "student": accelerator.unwrap_model(student).state_dict(),
            "ema": ema.module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "progress": asdict(progress),
            "processes": processes,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        writer.submit(state, checkpoint_path(folder, progress.step), keep)


def load_pretrain_checkpoint(path: Path, accelerator, student, ema, optimizer, scheduler, loader_shape: list[int]
                             ) -> tuple[Progress, ProcessState]:
    """Weights, optimizer and schedule in place; returns the run's progress and this process's state.

    Launched with other process or worker counts, the data positions cannot carry over: each process then
    starts a fresh stream (from the run's sample count), and process 0 takes over the summed tallies."""
    state = load_checkpoint(path)
    load_state_strict(accelerator.unwrap_model(student), state["student"], f"checkpoint {path} (student)")
    ema.module.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    progress = Progress(**state["progress"])
    saved = [ProcessState(**p) for p in state["processes"]]
    rank = accelerator.process_index
    if saved[0].loader_shape == list(loader_shape):
        mine = saved[rank]
    else:
        logger.warning("%s was written by %s processes x loader workers, this run has %s: the data order "
                       "continues from a fresh stream, not exactly where it stopped", path, saved[0].loader_shape,
                       loader_shape)
        counts = [sum(c) for c in zip(*(p.source_counts for p in saved))]
        first = rank == 0
        mine = ProcessState(counts if first else [0] * len(counts),
                            sum(p.skipped_samples for p in saved) if first else 0)
    return progress, mine
