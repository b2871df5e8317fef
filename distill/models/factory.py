"""Classifier models by name, like timm's `create_model`, across the libraries the students come from.

A name is `timm` by default (`mobilenetv4_conv_small`, `repvit_m1_1.dist_in1k`, `test_resnet`) or carries its
source as a prefix (`torchvision/shufflenet_v2_x1_0`: timm has no ShuffleNetV2). Sources live in a registry.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

from distill.engine.checkpoint import CheckpointMismatch, load_checkpoint, load_state_strict
from distill.errors import ConfigError
from distill.models.projection import without_projection_heads

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SOURCES: dict[str, Callable[..., nn.Module]] = {}


def register_source(prefix: str):
    def wrap(fn):
        _SOURCES[prefix] = fn
        return fn

    return wrap


def split_name(name: str) -> tuple[str, str]:
    """`torchvision/shufflenet_v2_x1_0` → (torchvision, shufflenet_v2_x1_0); a bare name is timm's."""
    source, _, model = name.rpartition("/")
    if source in _SOURCES:
        return source, model
    return "timm", name  # hub names such as `hf-hub:org/model` go to timm whole


@dataclass(frozen=True)
class InputSpec:
    """What a model expects of its input: the normalisation it was trained with and its native side."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    img_size: int
    interpolation: str = "bicubic"  # how its training data were resized


def fixed_input_size(name: str) -> bool:
    """Whether timm builds `name` for one input side only (ViTs: a position embedding per patch of that side)."""
    try:
        cfg = timm.get_pretrained_cfg(name)
    except Exception:  # an unknown name fails later, where create_model names it
        return False
    return bool(cfg and cfg.fixed_input_size)


@register_source("timm")
def _timm_model(name, num_classes, pretrained, drop_rate, drop_path_rate, img_size=None):
    kwargs = {"drop_rate": drop_rate}
    if img_size and fixed_input_size(name):  # timm resamples the position embedding of hub weights to it
        kwargs["img_size"] = img_size
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return timm.create_model(name, pretrained=pretrained, **kwargs)


class _DropoutLinear(nn.Linear):
    """A classifier with dropout on its input that keeps `nn.Linear`'s state-dict keys, so the weights still
    load into the library's own model strictly."""

    def __init__(self, linear: nn.Linear, p: float):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.load_state_dict(linear.state_dict())
        self.p = p

    def forward(self, x):
        return super().forward(F.dropout(x, self.p, self.training))


@register_source("torchvision")
def _torchvision_model(name, num_classes, pretrained, drop_rate, drop_path_rate, img_size=None):
    import torchvision

    if drop_path_rate:
        raise ConfigError(f"torchvision/{name} has no stochastic depth; set student.drop_path_rate=0")
    model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
    if num_classes is not None and model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    if drop_rate:
        model.fc = _DropoutLinear(model.fc, drop_rate)
    model.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": (3, 224, 224)}
    return model


@contextmanager
def hub_download_order(pretrained: bool = True):
    """Around the creation of a model with hub weights: in a launch of several processes the first process of
    each machine fetches them into that machine's cache, and the others start once those are done and read
    them from the cache, rather than every process downloading the same files at once.

    A collective when `pretrained` (every process must enter it, in the same order); nothing otherwise, and
    nothing for a single process. The first process releases the others whether or not it succeeded: they
    then try for themselves and fail with the same error instead of waiting for ever."""
    import torch.distributed as dist

    if not pretrained or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    from accelerate import PartialState

    state = PartialState()
    first = state.is_local_main_process
    if not first:
        state.wait_for_everyone()
    try:
        yield
    finally:
        if first:
            state.wait_for_everyone()


def create_model(
    name: str,
    num_classes: Optional[int] = None,
    pretrained: bool = False,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    checkpoint: Optional[str] = None,
    img_size: Optional[int] = None,
) -> nn.Module:
    """Build a classifier; `checkpoint` (a run checkpoint, state dict or exported folder) is loaded strictly.
    `img_size` builds a model of fixed input side (a ViT) for that side; other models take any side anyway."""
    source, model_name = split_name(name)
    try:
        with hub_download_order(pretrained):
            model = _SOURCES[source](model_name, num_classes, pretrained, drop_rate, drop_path_rate, img_size)
    except (RuntimeError, ValueError) as e:  # timm: RuntimeError, torchvision: ValueError
        if "Unknown model" in str(e) or "Unknown model" in repr(e):
            raise ConfigError(f"unknown model {name!r} (timm.list_models() lists timm's; "
                              f"torchvision's are named torchvision/<name>)") from None
        if isinstance(e, ValueError):  # a malformed name or arguments the model does not take
            raise ConfigError(f"cannot build model {name!r}: {e}") from None
        raise
    except OSError as e:  # hub weights out of reach (no network, or offline mode)
        raise ConfigError(f"cannot fetch the pretrained weights of {name!r}: {e}") from None
    if checkpoint:
        load_state_strict(model, read_state_dict(checkpoint), source=f"checkpoint {checkpoint}")
    return model


def zero_classifier(model: nn.Module) -> nn.Module:
    """For training from scratch: the classifier starts at zero (as big_vision's heads do), every class equally
    likely, a first loss of ln(classes). timm draws MobileNet classifiers from U(+-1/sqrt(classes)), a scale meant for
    1,000 classes: with ten, the first logits spread by several units (the demo's first distillation losses were
    near 7 rather than 2.3)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "fc", None)
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    return model


def read_state_dict(path: str | Path, prefer: str = "ema") -> dict:
    """The weights in a run checkpoint (`ema` or `student`), a plain state dict, a safetensors file, or an
    exported folder holding `model.safetensors`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = load_checkpoint(path)
    if isinstance(obj, dict) and ("student" in obj or "ema" in obj):
        other = "student" if prefer == "ema" else "ema"
        state = obj.get(prefer) or obj.get(other)
        return without_projection_heads(state)  # feature distillation's heads are training-only
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointMismatch(f"{path} holds no state dict (keys: {sorted(obj)[:10] if isinstance(obj, dict) else type(obj)})")


def input_spec(model: nn.Module) -> InputSpec:
    cfg = timm.data.resolve_data_config({}, model=model)
    return InputSpec(tuple(cfg["mean"]), tuple(cfg["std"]), int(cfg["input_size"][-1]),
                     str(cfg.get("interpolation") or "bicubic"))


def num_outputs(model: nn.Module) -> int:
    """The class count of a classifier's head."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "fc", None)
    if isinstance(head, nn.Linear):
        return head.out_features
    if hasattr(model, "num_classes"):
        return int(model.num_classes)
    raise ValueError(f"cannot tell the class count of {type(model).__name__}")
