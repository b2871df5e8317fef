"""timm's own folder format: `model.safetensors` + `config.json`, loadable with no code from this project:

    timm.create_model("local-dir:<folder>", pretrained=True)                      # the classifier
    timm.create_model("local-dir:<folder>", pretrained=True, features_only=True)  # a backbone

Written by timm's `save_for_hf`, so the format follows the installed timm. `config.json` carries the
distillation's input side and normalisation as the pretrained config, and the backbone card under `distill`.
"""
from __future__ import annotations

from pathlib import Path

import timm

from distill.export.card import backbone_card, write_card
from distill.export.source import StudentRun
from distill.models.factory import split_name


def export_timm(run: StudentRun, out: Path) -> Path:
    if split_name(run.name)[0] != "timm":
        raise ValueError(f"{run.name} is not a timm model; export it with --to torchvision")
    card = backbone_card(run, "timm")
    side = card["input"]["img_size"]
    data_config = {"input_size": (3, side, side), "mean": card["input"]["mean"], "std": card["input"]["std"]}
    if card["input"]["crop_pct"]:
        data_config["crop_pct"] = card["input"]["crop_pct"]
    model_config = {"distill": card}
    if card["provenance"]["recipe"]:
        model_config["pretrained_cfg"] = {"tag": f"distill-{Path(card['provenance']['recipe']).stem}"}
    timm.models.save_for_hf(run.model, str(out), model_config=model_config, safe_serialization=True,
                            data_config=data_config)
    write_card(out, card)
    return Path(out)
