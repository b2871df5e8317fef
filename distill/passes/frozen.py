"""The model a pass runs forward (curation scorer, labelling teacher): by name with hub weights, from a local
checkpoint, or, for the embedded demos, trained on a mix's labels first."""
from __future__ import annotations

import logging
from pathlib import Path

import timm

from distill.config import ConfigError
from distill.data.loader import build_train_loader
from distill.data.mix import DataMix
from distill.engine.speed import auto_on_gpu
from distill.models.teacher_fit import fit_supervised
from distill.models.factory import create_model
from distill.models.teacher import FrozenTeacher, create_teacher

logger = logging.getLogger("distill")


def build_frozen(mcfg, role: str, accelerator, out_dir: Path, data_root: str, num_workers: int = 2,
                 seed: int = 0) -> FrozenTeacher:
    """`mcfg` is a FrozenModelConfig; `role` names it in messages and in the fitted file (`<role>.pt`)."""
    checkpoint = mcfg.checkpoint
    if not checkpoint and not mcfg.pretrained:
        if mcfg.fit_steps <= 0:
            raise ConfigError(
                f"the {role} has no weights: set {role}.checkpoint=PATH, {role}.pretrained=true, or "
                f"{role}.fit_steps=N to train one on the labels of {role}.fit_mix first"
            )
        checkpoint = str(Path(out_dir) / f"{role}.pt")
        if not Path(checkpoint).exists():
            fit_on_labels(mcfg, role, accelerator, Path(checkpoint), data_root, num_workers, seed)
    model = create_teacher(mcfg.name, mcfg.pretrained and not checkpoint, checkpoint, mcfg.num_classes,
                           mcfg.img_size, mcfg.mean, mcfg.std, mcfg.interpolation)
    if model.num_classes != mcfg.num_classes:
        raise ConfigError(f"the {role} {mcfg.name} predicts {model.num_classes} classes but "
                          f"{role}.num_classes={mcfg.num_classes}; they must agree")
    return model.for_device(accelerator.device, accelerator.mixed_precision, auto_on_gpu(mcfg.channels_last),
                            mcfg.compile, mcfg.compile_mode)


def fit_on_labels(mcfg, role: str, accelerator, path: Path, data_root: str, num_workers: int, seed: int) -> None:
    logger.info("the %s has no weights: training %s on the labels of mix %r for %d steps", role, mcfg.name,
                mcfg.fit_mix, mcfg.fit_steps)
    mix = DataMix.load(mcfg.fit_mix, data_root)
    model = create_model(mcfg.name, num_classes=mcfg.num_classes)
    loader = build_train_loader(
        mix, mcfg.fit_img_size, mcfg.fit_batch_size, num_workers, seed + 1,
        total_samples=mcfg.fit_steps * mcfg.fit_batch_size * accelerator.num_processes,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
    )
    fit_supervised(model, loader, mcfg.fit_steps, mcfg.fit_lr, accelerator, path)


def eval_geometry(model: FrozenTeacher, img_size, crop_pct) -> tuple[int, float]:
    """The side and centre-crop share a model was evaluated at (its pretrained config), unless given."""
    cfg = timm.data.resolve_data_config({}, model=model.model)
    side = int(img_size or model.prepare.img_size or cfg["input_size"][-1])
    return side, float(crop_pct or cfg.get("crop_pct", 0.875))
