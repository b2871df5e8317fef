"""A detection fine-tuning run read back: its detector (weights loaded strictly) and its categories.

A source is a run folder (its newest checkpoint) or a checkpoint file `ckpt-XXXXXXXX.pt`. The run folder
holds `categories.json`, the training set's categories in label order ([{"id", "name"}]); without it
(older runs, a checkpoint copied alone) the training annotations named by the run's config are read, and
failing that the labels are named by number.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from distill.engine.checkpoint import (
    CheckpointMismatch,
    load_checkpoint,
    load_state_strict,
    resolve_checkpoint,
)

logger = logging.getLogger("distill")

CATEGORIES_FILE = "categories.json"
WEIGHTS = {"ema": "ema", "student": "model", "model": "model"}  # `student`: the export CLI's name for raw weights


@dataclass
class DetectorRun:
    model: nn.Module  # eval mode
    config: dict  # the run's resolved recipe
    checkpoint: Path
    weights: str  # ema | model
    categories: list[dict]  # [{"id", "name"}] in label order


def is_detection_checkpoint(obj) -> bool:
    """A detection fine-tuning checkpoint: `model` weights and a config naming a `model.backbone`."""
    config = obj.get("config") if isinstance(obj, dict) else None
    model_cfg = config.get("model") if isinstance(config, dict) else None
    return isinstance(model_cfg, dict) and "backbone" in model_cfg and "model" in obj


def is_detection_source(source: str | Path) -> bool:
    try:
        path = resolve_checkpoint(source)
        obj = load_checkpoint(path, mmap=True)
    except Exception:
        return False  # not ours or unreadable: the student loader reports it with the file's name
    return is_detection_checkpoint(obj)


def run_categories(folder: Path, config: dict, num_classes: int) -> list[dict]:
    path = Path(folder) / CATEGORIES_FILE
    if path.is_file():
        return json.loads(path.read_text())
    data = config.get("data", {})
    ann = Path(data.get("root", "")) / data.get("train_ann", "")
    if ann.is_file():
        cats = sorted(json.loads(ann.read_text()).get("categories", []), key=lambda c: c["id"])
        if len(cats) == num_classes:
            return [{"id": c["id"], "name": c.get("name", str(c["id"]))} for c in cats]
    logger.warning("no %s beside the checkpoint and no training annotations at %s: classes named by label", path, ann)
    return [{"id": i, "name": f"class_{i}"} for i in range(num_classes)]


def build_from_config(model_cfg: dict, eval_side: Optional[int] = None) -> nn.Module:
    """The run's detector, built bare (its weights come from the checkpoint: no backbone file, hub or init_from)."""
    from distill.detection.rtdetr import RTDETRConfig, build_rtdetr

    fields = {**model_cfg, "backbone_checkpoint": None, "pretrained_backbone": False, "init_from": None,
              "out_strides": tuple(model_cfg.get("out_strides", (8, 16, 32))),
              "eval_spatial_size": (eval_side, eval_side) if eval_side else None}
    return build_rtdetr(RTDETRConfig(**fields))


def load_detector(source: str | Path, weights: str = "ema", img_size: Optional[int] = None,
                  deploy: bool = False) -> DetectorRun:
    """The detector of a run or checkpoint in eval mode. `img_size` fixes its anchors for that side (export;
    the run's evaluation side when 0); `deploy` turns it into its deploy form (`distill.detection.deploy`)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is not one of {', '.join(WEIGHTS)}")
    path = resolve_checkpoint(source)
    ckpt = load_checkpoint(path)
    if not is_detection_checkpoint(ckpt):
        raise CheckpointMismatch(f"{path} is not a detection fine-tuning checkpoint")
    key = WEIGHTS[weights]
    if ckpt.get(key) is None:
        raise CheckpointMismatch(f"{path} holds no {key!r} weights")
    config = ckpt["config"]
    if img_size == 0:
        img_size = config.get("data", {}).get("img_size", 640)
    model = build_from_config(config["model"], img_size)
    load_state_strict(model, ckpt[key], f"checkpoint {path} ({key} weights)")
    model.eval()
    if deploy:
        from distill.detection.deploy import deploy_form

        deploy_form(model)
    categories = run_categories(path.parent, config, model.cfg.num_classes)
    return DetectorRun(model, config, path, key, categories)
