"""The teacher of a run: built from the recipe, or first trained on labels when the recipe gives it no weights
(the embedded demo does this)."""
from __future__ import annotations

import hashlib
import logging
from itertools import islice
from typing import Optional
from pathlib import Path

import torch.nn.functional as F

from distill.data.loader import build_train_loader
from distill.data.mix import DataMix
from distill.engine.checkpoint import atomic_save, load_checkpoint
from distill.engine.distributed import broadcast_from_main
from distill.engine.rng import seed_process
from distill.engine.speed import auto_on_gpu
from distill.engine.optim import build_optimizer, warmup_cosine
from distill.engine.progress import ProgressBar
from distill.errors import ConfigError
from distill.models.factory import create_model, input_spec, zero_classifier
from distill.models.teacher import InputAdapter, create_teacher

logger = logging.getLogger("distill")


def fit_fingerprint(cfg, mix, processes: int) -> dict:
    """What a fitted teacher depends on: a `teacher.pt` fitted under other settings is not reused."""
    t = cfg.teacher
    mix_text = mix.path.read_text() if mix.path is not None else repr(mix.sources)
    return {"name": t.name, "num_classes": cfg.student.num_classes, "fit_steps": t.fit_steps, "fit_lr": t.fit_lr,
            "img_size": cfg.data.img_size, "batch_size": cfg.data.batch_size, "processes": processes,
            "seed": cfg.train.seed, "data_root": str(cfg.data.root),
            "mix": hashlib.sha256(mix_text.encode()).hexdigest()[:16]}


def _fitted_with(path: Path, fingerprint: dict) -> bool:
    if not path.exists():
        return False
    saved = load_checkpoint(path).get("fingerprint")
    if saved != fingerprint:
        logger.warning("%s was fitted with other settings (%s): fitting the teacher again", path,
                       {k: v for k, v in (saved or {}).items() if fingerprint.get(k) != v})
        return False
    return True


def fit_supervised(model, loader, steps: int, lr: float, accelerator, out_path: Path,
                   fingerprint: Optional[dict] = None, seed: int = 0) -> None:
    """Cross-entropy on labels for `steps` steps; the weights (and the settings they were fitted with) are
    saved to `out_path` (main process)."""
    prepare = InputAdapter(input_spec(model)).to(accelerator.device)
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.05)
    scheduler = warmup_cosine(optimizer, warmup_steps=steps // 20, total_steps=steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    seed_process(seed, accelerator.process_index)
    model.train()
    bar = ProgressBar(steps, "teacher", enabled=accelerator.is_main_process)
    for i, batch in enumerate(islice(loader, steps)):
        images = batch["image"].to(accelerator.device, non_blocking=True).float().div_(255)
        labels = batch["label"].to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            loss = F.cross_entropy(model(prepare(images)), labels, label_smoothing=0.1)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(i + 1, images=len(images) * accelerator.num_processes)
        if (i + 1) % 20 == 0 or i + 1 == steps:  # a host sync only now and then
            bar.log(loss=loss.item())
    bar.close()
    model = accelerator.unwrap_model(model).eval()
    if accelerator.is_main_process:
        atomic_save({"model": model.state_dict(), "fingerprint": fingerprint}, out_path)
        logger.info("teacher trained for %d steps, saved to %s", steps, out_path)
    accelerator.wait_for_everyone()


def build_teacher(cfg, mix, accelerator, out: Path):
    """The configured teacher; with no weights and `teacher.fit_steps`, one trained on labels first (of
    `teacher.fit_mix`, default the run's mix). Its class count must be the student's when it teaches logits
    (`loss.kd_weight`); a teacher of feature maps alone may have any head, or none (DINOv2's)."""
    t = cfg.teacher
    checkpoint = t.checkpoint
    if not checkpoint and not t.pretrained:
        if t.fit_steps <= 0:
            raise ConfigError(
                "the teacher has no weights: set teacher.checkpoint=PATH, teacher.pretrained=true, "
                "or teacher.fit_steps=N to train one on labels first"
            )
        checkpoint = str(out / "teacher.pt")
        if t.fit_mix:
            mix = DataMix.load(t.fit_mix, cfg.data.root)
        fingerprint = fit_fingerprint(cfg, mix, accelerator.num_processes)
        fitted = _fitted_with(Path(checkpoint), fingerprint) if accelerator.is_main_process else None
        if not broadcast_from_main(fitted):  # one decision for all processes
            logger.info("the teacher %s has no weights: training it on labels for %d steps first "
                        "(teacher.fit_steps; saved as %s)", t.name, t.fit_steps, checkpoint)
            model = zero_classifier(create_model(t.name, num_classes=cfg.student.num_classes,
                                                 img_size=cfg.data.img_size))  # a ViT: built for the views' side
            loader = build_train_loader(
                mix, cfg.data.img_size, cfg.data.batch_size, cfg.data.num_workers, cfg.train.seed + 1,
                total_samples=t.fit_steps * cfg.data.batch_size * accelerator.num_processes,
                rank=accelerator.process_index, world_size=accelerator.num_processes,
            )
            fit_supervised(model, loader, t.fit_steps, t.fit_lr, accelerator, Path(checkpoint), fingerprint,
                           cfg.train.seed + 1)
    teacher = create_teacher(t.name, t.pretrained and not checkpoint, checkpoint, cfg.student.num_classes,
                             t.img_size, t.mean, t.std, t.interpolation, view_size=cfg.data.img_size)
    if cfg.loss.kd_weight and teacher.num_classes != cfg.student.num_classes:
        raise ConfigError(
            f"the teacher {t.name} predicts {teacher.num_classes} classes but student.num_classes="
            f"{cfg.student.num_classes}; they must agree"
        )
    return teacher.for_device(accelerator.device, accelerator.mixed_precision, auto_on_gpu(t.channels_last), t.compile,
                              t.compile_mode)


def describe_teacher(cfg) -> str:
    """Where the run's soft labels come from, in a line for the start-up banner."""
    t = cfg.teacher
    if t.mode == "offline":
        return f"offline: stored soft labels of mix {cfg.data.mix}, at temperature {cfg.loss.temperature}"
    if not cfg.loss.kd_weight and not cfg.loss.feature_weight:
        return "none (loss.kd_weight=0: labels only)"
    if t.checkpoint:
        source = f"weights from {t.checkpoint}"
    elif t.pretrained:
        source = "hub weights"
    else:
        source = f"trained on labels for {t.fit_steps} steps first (teacher.fit_steps)"
    taught = [f"logits at temperature {cfg.loss.temperature}, kd_weight {cfg.loss.kd_weight}"] if cfg.loss.kd_weight else []
    if cfg.loss.feature_weight:
        taught.append(f"feature maps of layers {list(t.features)} at student strides {list(cfg.feature.strides)}, "
                      f"{cfg.loss.feature_loss}, feature_weight {cfg.loss.feature_weight}")
    return f"online, {source}; " + "; ".join(taught)
