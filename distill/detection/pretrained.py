"""Start a detector from COCO-pretrained RT-DETR or D-FINE weights (`model.init_from=PATH`).

PATH is an official RT-DETRv2 or D-FINE / DEIM checkpoint (`.pth`: its EMA weights, else its model weights),
a transformers RT-DETR / RT-DETRv2 / D-FINE folder (`config.json` + `model.safetensors`), or a checkpoint of
this project. The weights must be of the detector's head (`model.head`), and D-FINE's of its `model.reg_max`
(the bins of its edge distributions) and, where the file says, of its split of sampling points over the levels
when the total is the same (`model.num_points_per_level`): each mismatch is refused with one line. Every
encoder and decoder tensor whose shape matches is loaded; the backbone is left as given (a distilled one,
typically); the class-dependent tensors (the score heads and the denoising label embedding) keep their
fresh initialisation when the class count differs; anything else that does not fit (other widths, other
levels) keeps its fresh initialisation too. `InitReport` says which tensors went which way.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from distill.detection import dfine_layout
from distill.detection.layouts import gather, layout_keys
from distill.engine.checkpoint import CheckpointMismatch, load_checkpoint

CLASS_DEPENDENT = ("decoder.enc_score_head.", "decoder.score_heads.", "decoder.denoising_class_embed.")
HF_MODEL_TYPES = ("rt_detr", "rt_detr_v2", "d_fine")
HEAD_NAMES = {"rtdetrv2": "RT-DETR", "dfine": "D-FINE"}
# D-FINE's decoder alone holds these, in every layout (ours, the reference's, transformers')
_DFINE_ONLY = re.compile(r"(^|\.)(lqe_layers|pre_bbox_head)\.")


@dataclass
class InitReport:
    source: str
    layout: str  # ours | reference | transformers
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # class-dependent, the class count differs
    skipped: dict[str, str] = field(default_factory=dict)  # our key → why it kept its fresh initialisation
    kept: list[str] = field(default_factory=list)  # the backbone's tensors, left as given
    unused: list[str] = field(default_factory=list)  # source tensors nothing here took

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self, show: int = 8) -> str:
        def some(items) -> str:
            items = list(items)
            return ", ".join(items[:show]) + (f", ... ({len(items) - show} more)" if len(items) > show else "")

        lines = [f"{self.source} ({self.layout} layout): {len(self.loaded)} tensors loaded, "
                 f"{len(self.kept)} backbone tensors kept as given"]
        if self.reinitialised:
            lines.append(f"re-initialised (class count differs): {some(self.reinitialised)}")
        if self.skipped:
            lines.append(f"skipped, freshly initialised: {some(f'{k} ({v})' for k, v in self.skipped.items())}")
        if self.unused:
            lines.append(f"unused from the source: {len(self.unused)} tensors ({some(self.unused)})")
        return "\n".join(lines)


def read_detector_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, its layout) of an RT-DETR checkpoint file or transformers folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model.init_from={path}: no such file or folder")
    if path.is_dir():
        config = path / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"{path} is not a transformers RT-DETR or D-FINE folder (config.json model_type "
                             f"{model_type!r}, expected one of {HF_MODEL_TYPES})")
        return hf_state_dict(path), "transformers"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = _state_dict_of(load_checkpoint(path), path)  # weights_only: refuses files that would run code
    return state, _detect_layout(state, path)


def hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a saved transformers detector, read by transformers itself: the names it writes to disk
    follow its checkpoint conventions, the names in memory are the model's modules."""
    from transformers import AutoModelForObjectDetection

    return AutoModelForObjectDetection.from_pretrained(str(folder)).state_dict()


def _state_dict_of(obj, path: Path) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint: EMA first (the reference's `ema.module`, ours `ema`), then `model`."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    for key in ("ema", "model"):
        value = obj.get(key)
        if isinstance(value, dict) and isinstance(value.get("module"), dict):
            value = value["module"]
        if isinstance(value, dict) and value and all(torch.is_tensor(v) for v in value.values()):
            return value
    if obj and all(torch.is_tensor(v) for v in obj.values()):
        return obj
    raise ValueError(f"{path} holds no state dict under 'ema' or 'model' (keys: {sorted(obj)[:10]})")


def _detect_layout(state: dict, path: Path) -> str:
    if any(k.startswith("decoder.decoder.layers.") for k in state):
        return "reference"
    if any(k.startswith("model.decoder.layers.") for k in state):
        return "transformers"
    if any(k.startswith("decoder.layers.") for k in state):
        return "ours"
    raise ValueError(f"{path} does not look like RT-DETR weights (no decoder layers among {len(state)} keys)")


def head_of(state: dict[str, torch.Tensor]) -> str:
    """The decoder head (`rtdetrv2` | `dfine`) whose weights `state` holds, in any layout."""
    return "dfine" if any(_DFINE_ONLY.search(k) for k in state) else "rtdetrv2"


def check_same_head(model: nn.Module, source: dict[str, torch.Tensor], path) -> None:
    """Refuse weights of the other decoder head, and D-FINE weights of other distribution settings."""
    head, theirs = model.cfg.head, head_of(source)
    if theirs != head:
        raise CheckpointMismatch(f"model.init_from={path} holds {HEAD_NAMES[theirs]} weights and this detector has "
                                 f"model.head={head}: set model.head={theirs} to start from them")
    if head != "dfine":
        return
    bins = dfine_layout.bins_of(source)
    if bins is not None and bins != model.cfg.reg_max:
        raise CheckpointMismatch(f"model.init_from={path} has reg_max={bins} (its edge distributions have "
                                 f"{bins + 1} bins) and the recipe model.reg_max={model.cfg.reg_max}: set "
                                 f"model.reg_max={bins}")
    scale = next((v for k, v in source.items() if k.endswith("decoder.reg_scale")), None)
    if scale is not None and abs(float(scale.reshape(-1)[0]) - model.cfg.reg_scale) > 1e-6:
        raise CheckpointMismatch(f"model.init_from={path} has reg_scale={float(scale.reshape(-1)[0]):g} and the "
                                 f"recipe model.reg_scale={model.cfg.reg_scale:g}: set model.reg_scale to match")
    # as many points split otherwise over the levels (D-FINE-S [3, 6, 3], others [4, 4, 4]) give tensors of the
    # same shapes that would load and sample wrongly; only the offset scales the official and transformers files
    # store tell them apart. Other totals mis-shape those tensors, which the report lists as skipped.
    offsets = next((v for k, v in source.items() if k.endswith("num_points_scale")), None)
    if offsets is not None:
        theirs, ours = points_per_level(offsets), model.decoder.layers[0].cross_attn.points_per_level
        if theirs != ours and sum(theirs) == sum(ours):
            raise CheckpointMismatch(f"model.init_from={path} samples {theirs} points per level and this detector "
                                     f"{ours}: set model.num_points_per_level={theirs}")


def points_per_level(offset_scales: torch.Tensor) -> list[int]:
    """The points per level behind D-FINE's offset scales (1 / n, repeated n times for a level of n points)."""
    values, counts, i = offset_scales.flatten().tolist(), [], 0
    while i < len(values):
        n = max(1, round(1 / values[i])) if values[i] > 0 else 1
        counts.append(n)
        i += n
    return counts


def _source_keys(model: nn.Module, key: str, layout: str) -> list[str] | None:
    if layout == "ours":
        return [key]
    if model.cfg.head == "dfine":
        return dfine_layout.layout_keys(key, layout, model.cfg.fusion_block)
    return layout_keys(key, layout)


def load_detector_weights(model: nn.Module, path: str | Path, backbone: bool = False) -> InitReport:
    """Load the encoder and decoder tensors of `path` that fit `model` (in place). The backbone stays as given,
    unless `backbone` is set and `path` is a checkpoint of this project holding this very backbone (every tensor
    of the same name and shape): then it comes along, as a whole detector's does."""
    source, layout = read_detector_weights(path)
    check_same_head(model, source, path)
    report = InitReport(str(path), layout)
    chosen, used = {}, set()
    own = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    if backbone and layout == "ours" and all(k in source and source[k].shape == v.shape for k, v in own.items()):
        chosen |= {k: source[k].to(v.dtype) for k, v in own.items()}
        used.update(own)
        report.loaded += list(own)
        own = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            if key in own:
                report.kept.append(key)
            continue
        keys = _source_keys(model, key, layout)
        tensor = gather(source, keys) if keys else None
        if tensor is None:
            report.skipped[key] = "not in the source"
            continue
        used.update(keys)
        if tensor.shape != value.shape:
            if key.startswith(CLASS_DEPENDENT):
                report.reinitialised.append(key)
            else:
                report.skipped[key] = f"shape {list(tensor.shape)} there, {list(value.shape)} here"
            continue
        chosen[key] = tensor.to(value.dtype)
        report.loaded.append(key)
    if not chosen:
        raise ValueError(f"model.init_from={path}: none of its {len(source)} tensors fits this detector "
                         f"({layout} layout); is it a {HEAD_NAMES[model.cfg.head]} checkpoint of the same width?")
    model.load_state_dict(chosen, strict=False)
    report.unused = sorted(set(source) - used)
    return report
