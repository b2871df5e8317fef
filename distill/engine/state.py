"""What a pretraining run must carry across an interruption, and its checkpoint file."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from omegaconf import OmegaConf

from distill.engine.checkpoint import (
    atomic_save,
    checkpoint_path,
    load_checkpoint,
    load_state_strict,
    prune_checkpoints,
)
from distill.engine.rng import capture_rng, restore_rng

logger = logging.getLogger("distill")


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken (skipped non-finite steps included: they consumed data)
    samples: int = 0  # global samples drawn from the mix: the data stream and the mix schedule resume here
    skipped_samples: int = 0  # corrupt or undecodable samples skipped by the loaders
    bad_steps: int = 0  # non-finite losses in all
    bad_in_row: int = 0
    source_counts: list[int] = field(default_factory=list)  # realised draws per mix source


def save_pretrain_checkpoint(folder, accelerator, student, ema, optimizer, scheduler, progress: Progress, cfg, keep: int):
    """All processes call this; the main one writes. RNG states are gathered from every process."""
    from accelerate.utils import gather_object

    rng = gather_object([capture_rng()])
    if accelerator.is_main_process:
        state = {
            "student": accelerator.unwrap_model(student).state_dict(),
            "ema": ema.module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "progress": asdict(progress),
            "rng": rng,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        path = checkpoint_path(folder, progress.step)
        atomic_save(state, path)
        prune_checkpoints(folder, keep)
        logger.info("checkpoint %s", path)
    accelerator.wait_for_everyone()


def load_pretrain_checkpoint(path: Path, accelerator, student, ema, optimizer, scheduler) -> Progress:
    state = load_checkpoint(path)
    load_state_strict(accelerator.unwrap_model(student), state["student"], f"checkpoint {path} (student)")
    ema.module.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    restore_rng(rng[accelerator.process_index] if accelerator.process_index < len(rng) else rng[0])
    logger.info("resumed from %s at step %d", path, state["progress"]["step"])
    return Progress(**state["progress"])

