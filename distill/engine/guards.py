"""Checks that keep a run honest: non-finite updates are skipped alike on every process, and processes that
drifted apart are reported."""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("distill")


def update_is_finite(accelerator, loss, grad_norm) -> bool:
    """Whether to apply this step's update; the same answer on every process.

    One host sync per optimizer step. Without a grad scaler the process-averaged gradient norm decides; with
    fp16's scaler, inf gradients are its own business (it skips and lowers the scale), so the loss decides.
    """
    if accelerator.scaler is None:
        return bool(torch.isfinite(grad_norm))
    return bool(torch.isfinite(accelerator.reduce(loss.detach().float(), reduction="sum")))


def weight_checksums(accelerator, student) -> list[float]:
    """One number per process summarising its student weights; DDP keeps them equal, and a run whose
    processes drifted apart says so rather than saving one process's weights as the result."""
    with torch.no_grad():
        local = sum(p.double().sum() + (p.double() ** 2).sum() for p in accelerator.unwrap_model(student).parameters())
    sums = accelerator.gather(local.reshape(1)).tolist()
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(max(sums))):
        logger.warning("student weights differ across processes: %s", sums)
    return sums
