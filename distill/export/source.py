"""What an export starts from: a pretraining run's student, its weights loaded strictly, and where they came from.

A source is a run folder (its newest checkpoint), a run checkpoint `ckpt-XXXXXXXX.pt`, or, with the model
named explicitly, a plain state dict / safetensors file / exported folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torch import nn

from distill.engine.checkpoint import (
    CheckpointMismatch,
    load_checkpoint,
    load_state_strict,
    resolve_checkpoint,
)
from distill.models.factory import create_model, read_state_dict
from distill.export.targets import WEIGHTS
from distill.models.projection import without_projection_heads



@dataclass
class StudentRun:
    """A student classifier in eval mode with the run facts an export records next to its weights."""

    model: nn.Module
    name: str  # as `distill.models.factory.create_model` takes it (`torchvision/...` for torchvision's)
    num_classes: int
    weights: str  # ema | student | file
    checkpoint: Path
    config: dict = field(default_factory=dict)  # the run's resolved recipe (empty for a plain state dict)
    summary: dict = field(default_factory=dict)  # the run's summary.json (empty when absent)
    step: Optional[int] = None


def is_run_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("config"), dict) and ("student" in obj or "ema" in obj)


def load_student(
    source: str | Path,
    weights: str = "ema",
    model_name: Optional[str] = None,
    num_classes: Optional[int] = None,
) -> StudentRun:
    """Build the run's student and load the chosen weights strictly (a checkpoint that does not fit raises
    `CheckpointMismatch` naming the missing, unexpected and mis-shaped keys)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is not one of {', '.join(WEIGHTS)}")
    path = resolve_checkpoint(source)
    config, summary, step = {}, {}, None
    obj = load_checkpoint(path) if path.is_file() and path.suffix != ".safetensors" else None
    if is_run_checkpoint(obj):
        config = obj["config"]
        if obj.get(weights) is None:
            present = [w for w in WEIGHTS if obj.get(w) is not None]
            raise CheckpointMismatch(f"{path} holds no {weights!r} weights (it has: {', '.join(present) or 'none'})")
        state = without_projection_heads(obj[weights])  # feature distillation's heads are not the student's
        step = (obj.get("progress") or {}).get("step")
        summary_file = path.parent / "summary.json"
        if summary_file.exists():
            summary = json.loads(summary_file.read_text())
        model_name = model_name or config["student"]["name"]
        num_classes = num_classes or config["student"]["num_classes"]
    else:
        if not (model_name and num_classes):
            raise CheckpointMismatch(
                f"{path} is not a run checkpoint (no 'config'); name the model and its class count "
                "(--model NAME --num-classes N)"
            )
        state, weights = read_state_dict(path, prefer=weights), "file"
    model = create_model(model_name, num_classes=num_classes)
    load_state_strict(model, state, source=f"checkpoint {path} ({weights} weights)")
    return StudentRun(model.eval(), model_name, int(num_classes), weights, path, config, summary, step)
