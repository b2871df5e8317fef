"""The teacher of a run: built from the recipe, or first trained on labels when the recipe gives it no weights
(the embedded demo does this)."""
from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distill.engine.checkpoint import atomic_save
from distill.engine.optim import build_optimizer, warmup_cosine
from distill.data.loader import build_train_loader
from distill.models.factory import create_model, input_spec
from distill.models.teacher import InputAdapter, create_teacher

logger = logging.getLogger("distill")


def fit_supervised(model, loader, steps: int, lr: float, accelerator, out_path: Path) -> None:
    """Cross-entropy on labels for `steps` steps; the weights are saved to `out_path` (main process)."""
    prepare = InputAdapter(input_spec(model)).to(accelerator.device)
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.05)
    scheduler = warmup_cosine(optimizer, warmup_steps=steps // 20, total_steps=steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    bar = tqdm(islice(loader, steps), total=steps, desc="teacher", disable=not accelerator.is_main_process)
    for i, batch in enumerate(bar):
        images = batch["image"].to(accelerator.device, non_blocking=True).float().div_(255)
        labels = batch["label"].to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            loss = F.cross_entropy(model(prepare(images)), labels, label_smoothing=0.1)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if i % 20 == 0:  # a host sync only now and then
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model = accelerator.unwrap_model(model).eval()
    if accelerator.is_main_process:
        atomic_save({"model": model.state_dict()}, out_path)
        logger.info("teacher trained for %d steps, saved to %s", steps, out_path)
    accelerator.wait_for_everyone()


def build_teacher(cfg, mix, accelerator, out: Path):
    """The configured teacher; with no weights and `teacher.fit_steps`, one trained on labels first."""
    t = cfg.teacher
    checkpoint = t.checkpoint
    if not checkpoint and not t.pretrained:
        if t.fit_steps <= 0:
            raise SystemExit(
                "error: the teacher has no weights: set teacher.checkpoint=PATH, teacher.pretrained=true, "
                "or teacher.fit_steps=N to train one on labels first"
            )
        checkpoint = str(out / "teacher.pt")
        if not Path(checkpoint).exists():
            model = create_model(t.name, num_classes=cfg.student.num_classes)
            loader = build_train_loader(
                mix, cfg.data.img_size, cfg.data.batch_size, cfg.data.num_workers, cfg.train.seed + 1,
                total_samples=t.fit_steps * cfg.data.batch_size * accelerator.num_processes,
                rank=accelerator.process_index, world_size=accelerator.num_processes,
            )
            fit_supervised(model, loader, t.fit_steps, t.fit_lr, accelerator, Path(checkpoint))
    teacher = create_teacher(t.name, t.pretrained and not checkpoint, checkpoint, cfg.student.num_classes,
                             t.img_size, t.mean, t.std, t.interpolation)
    if teacher.num_classes != cfg.student.num_classes:
        raise SystemExit(
            f"error: the teacher {t.name} predicts {teacher.num_classes} classes but student.num_classes="
            f"{cfg.student.num_classes}; they must agree"
        )
    if t.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    if t.compile:
        teacher = torch.compile(teacher)
    return teacher.to(accelerator.device)
