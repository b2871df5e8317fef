"""This project's RT-DETR: the student's native folder (timm or torchvision) plus a ready detection recipe.

    python distill/finetune_det.py recipe=<folder>/rtdetr.yaml data.root=/datasets/coco

`rtdetr.yaml` starts from the `rtdetr_*` recipe made for the same backbone (or `rtdetr_base`) and points
`model.backbone_checkpoint` at the folder, which `distill.models.features` reads (`model.safetensors`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from distill.config import RECIPE_DIR
from distill.engine.checkpoint import atomic_write_text
from distill.export.source import StudentRun
from distill.export.timm_folder import export_timm
from distill.export.torchvision_state import export_torchvision
from distill.models.factory import split_name

NATIVE = {"timm": export_timm, "torchvision": export_torchvision}
RECIPE_NAME = "rtdetr.yaml"


def matching_recipe(backbone: str, recipe_dir: Path = RECIPE_DIR) -> str:
    """The `rtdetr_*` recipe whose backbone is `backbone` (its size-specific schedule), else `rtdetr_base`."""
    from distill.detection.recipe import load_det_config

    for path in sorted(recipe_dir.glob("rtdetr_*.yaml")):
        if path.stem != "rtdetr_base" and load_det_config([f"recipe={path.stem}"], recipe_dir).model.backbone == backbone:
            return path.stem
    return "rtdetr_base"


def export_rtdetr_backbone(run: StudentRun, out: Path, det_recipe: Optional[str] = None) -> Path:
    out = Path(out)
    NATIVE[split_name(run.name)[0]](run, out)
    base = det_recipe or matching_recipe(run.name)
    recipe = (
        f"# RT-DETR fine-tuning of the distilled {run.name} ({run.weights} weights of {run.checkpoint.name})\n"
        f"base: {base}\n"
        f"model:\n"
        f"  backbone: {run.name}\n"
        f"  backbone_checkpoint: {out.resolve()}\n"
    )
    atomic_write_text(out / RECIPE_NAME, recipe)
    return out
