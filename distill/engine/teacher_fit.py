"""Train a teacher on labels when a recipe has none (the embedded demo): plain supervised learning."""
from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distill.engine.checkpoint import atomic_save
from distill.engine.optim import build_optimizer, warmup_cosine
from distill.models.teacher import InputAdapter
from distill.models.factory import input_spec

logger = logging.getLogger("distill")


def fit_supervised(model, loader, steps: int, lr: float, accelerator, out_path: Path) -> None:
    """Cross-entropy on labels for `steps` steps; the weights are saved to `out_path` (main process)."""
    prepare = InputAdapter(input_spec(model)).to(accelerator.device)
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.05)
    scheduler = warmup_cosine(optimizer, warmup_steps=steps // 20, total_steps=steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    bar = tqdm(islice(loader, steps), total=steps, desc="teacher", disable=not accelerator.is_main_process)
    for batch in bar:
        images = batch["image"].to(accelerator.device, non_blocking=True).float().div_(255)
        labels = batch["label"].to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            loss = F.cross_entropy(model(prepare(images)), labels, label_smoothing=0.1)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model = accelerator.unwrap_model(model).eval()
    if accelerator.is_main_process:
        atomic_save({"model": model.state_dict()}, out_path)
        logger.info("teacher trained for %d steps, saved to %s", steps, out_path)
    accelerator.wait_for_everyone()
