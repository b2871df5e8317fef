"""How long a run is: optimizer steps, the global batch and the warm-up, from the recipe and the mix."""
from __future__ import annotations

import math

from distill.errors import ConfigError


def plan_steps(cfg, mix, world_size: int) -> tuple[int, int, int]:
    """Total optimizer steps, the global batch (samples per optimizer step) and the warm-up steps.

    A recipe that names `data.global_batch_size` keeps it on any number of processes: the per-process batch
    is derived from it here (and written back to the saved configuration). An epoch is one pass over the
    mix's first source unless `data.samples_per_epoch` says otherwise."""
    if cfg.data.global_batch_size:
        share = world_size * cfg.optim.grad_accum
        if cfg.data.global_batch_size % share:
            raise ConfigError(
                f"data.global_batch_size={cfg.data.global_batch_size} does not split evenly over "
                f"{world_size} processes x optim.grad_accum={cfg.optim.grad_accum}"
            )
        cfg.data.batch_size = cfg.data.global_batch_size // share
    global_batch = cfg.data.batch_size * world_size * cfg.optim.grad_accum
    steps_per_epoch = epoch_steps(cfg, mix, global_batch)
    total = int(cfg.train.steps) if cfg.train.steps else max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else cfg.optim.warmup_epochs * steps_per_epoch
    return total, global_batch, min(int(warmup), total)


def epoch_steps(cfg, mix, global_batch: int) -> float:
    """Optimizer steps in one epoch: a pass over `data.samples_per_epoch`, or over the mix's first source."""
    return (cfg.data.samples_per_epoch or mix.num_samples(mix.source_names[0])) / global_batch
