"""AdamW with no weight decay on norms and biases, and a linear warm-up into a cosine decay (or DEIM's
warm-up, flat stretch and cosine)."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from timm.optim import param_groups_weight_decay


def build_optimizer(
    params: torch.nn.Module | Iterable[dict],
    lr: float,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """A module gets timm's split (1-D parameters, i.e. norms and biases, free of decay); param groups
    pass through as given, so a caller can set per-group learning rates (a slower backbone, say).

    The fused kernel is used wherever torch has it (CUDA and CPU): one kernel for all parameters, and it can
    skip a step on the device (`found_inf`) with no host sync, which the update guard relies on."""
    groups = param_groups_weight_decay(params, weight_decay) if isinstance(params, torch.nn.Module) else params
    groups = [dict(g) for g in groups]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a parameter type or device without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier of each group's base LR: 0 → 1 over `warmup_steps`, then cosine to `min_lr_ratio`."""
    warmup_steps = max(0, int(warmup_steps))
    total_steps = max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def flat_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, flat_steps: int, no_aug_steps: int,
    min_lr_ratio: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """DEIM's FlatCosineLRScheduler as a per-step multiplier of each group's base LR: a quadratic warm-up
    over `warmup_steps`, 1 until step `flat_steps`, a cosine down to `min_lr_ratio` that ends where the last
    `no_aug_steps` start, then `min_lr_ratio` to the end.

    Step k takes DEIM's value at iteration k, except in the warm-up, where it takes ((k + 1) / warmup)^2, so
    that the first step does not run at LR 0 (the linear warm-up above does the same)."""
    warmup_steps, total_steps = max(0, int(warmup_steps)), max(1, int(total_steps))
    cosine_end = total_steps - max(0, int(no_aug_steps))
    flat_steps = int(flat_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return ((step + 1) / warmup_steps) ** 2
        if step <= flat_steps:
            return 1.0
        if step >= cosine_end:
            return min_lr_ratio
        progress = (step - flat_steps) / max(1, cosine_end - flat_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
