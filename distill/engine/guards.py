"""Checks that keep a run honest: non-finite updates are skipped alike on every process, and processes that
drifted apart are reported."""
from __future__ import annotations

import logging

import torch

from distill.errors import NonFiniteLoss

logger = logging.getLogger("distill")


class UpdateGuard:
    """Applies an optimizer step unless the gradients are non-finite, and counts the skipped steps.

    The decision is the same on every process (the gradient norm is that of the all-reduced gradients) and is
    taken on the device: fused AdamW takes a `found_inf` flag and then leaves parameters and its own state as
    they were, so no host sync is needed per step. With fp16's grad scaler the scaler skips inf steps itself;
    with an optimizer that has no fused kernel the flag is read on the host (one sync per step). The counts
    live on the device and are read by `check` at log and checkpoint steps, which also stops the run after
    `max_in_row` skipped steps in a row. With the scaler a step counts as skipped where this process's own
    loss was non-finite, so the counts can differ between processes: `check` takes their maximum over the
    processes first, and every process then stops at the same step, or none does.
    """

    def __init__(self, accelerator, optimizer, max_in_row: int, bad_steps: int = 0, bad_in_row: int = 0):
        self.accelerator, self.optimizer, self.max_in_row = accelerator, optimizer, max_in_row
        self.inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
        self.on_device = bool(self.inner.defaults.get("fused")) and accelerator.scaler is None
        device = accelerator.device
        self.counts = torch.tensor([bad_steps, bad_in_row, bad_in_row], device=device)  # total, in a row, worst row
        self.reported = bad_steps

    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        if self.accelerator.scaler is not None:
            bad = ~torch.isfinite(loss.detach()).all()
            self.optimizer.step()
        elif self.on_device:
            bad = ~torch.isfinite(grad_norm)
            self.inner.found_inf = bad.float()
            self.optimizer.step()
        else:
            bad = ~torch.isfinite(grad_norm)
            if not bool(bad):  # the one host sync of this path
                self.optimizer.step()
        bad = bad.long()
        total, row, worst = self.counts.unbind()
        row = (row + bad) * bad
        self.counts = torch.stack([total + bad, row, torch.maximum(worst, row)])

    def check(self, step: int) -> tuple[int, int]:
        """(skipped steps in all, skipped in a row now), the same on every process (every process must call
        this at the same step); raises NonFiniteLoss past `max_in_row` in a row."""
        if self.accelerator.num_processes > 1:
            # in place: every process goes on from the counts it saves in a checkpoint
            torch.distributed.all_reduce(self.counts, torch.distributed.ReduceOp.MAX)
        total, row, worst = self.counts.tolist()
        if worst >= self.max_in_row:
            raise NonFiniteLoss(
                f"{worst} non-finite updates in a row by step {step}; stopping (train.max_bad_steps="
                f"{self.max_in_row}). Lower optim.lr or check the data."
            )
        if total > self.reported:
            logger.warning("%d updates skipped for non-finite gradients by step %d (%d in a row now)", total, step, row)
            self.reported = total
        return total, row


def weight_checksums(accelerator, student) -> list[float]:
    """One number per process summarising its student weights; DDP keeps them equal, and a run whose
    processes drifted apart says so rather than saving one process's weights as the result."""
    with torch.no_grad():
        local = sum(p.double().sum() + (p.double() ** 2).sum() for p in accelerator.unwrap_model(student).parameters())
    sums = accelerator.gather(local.reshape(1)).tolist()
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(max(sums))):
        logger.warning("student weights differ across processes: %s", sums)
    return sums
