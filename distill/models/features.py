"""Backbones as multi-scale feature extractors, like timm's `features_only`, across the students' libraries.

`create_feature_extractor(name)` returns a module whose forward gives a list of feature maps at `out_strides`
and which carries `.channels` and `.strides`, both read from the model (timm's `feature_info`, or a dummy
forward for torchvision), never typed by hand. Sources live in a registry keyed on the name's prefix, as in
`distill.models.factory`: a bare name is timm's, `torchvision/shufflenet_v2_x1_0` is torchvision's.

Which map is "stride 32": timm's MobileNetV4 feature_info ends at `blocks.4`, the 1x1 conv to 960 channels
(the last block, before global pooling and the 1280-wide `conv_head`), so indices (2, 3, 4) give 8/16/32
with 960 channels at stride 32. For ShuffleNetV2 the maps are the outputs of stage2/3/4 (116/232/464
channels for x1.0); the 1x1 `conv5` to 1024 channels before pooling is left out, which is what reproduces
the reference RT-DETR size with this backbone (9.7M params / 29.6 GFLOPs at 640).

`checkpoint` takes what this project's pretraining writes (a dict with `ema`/`student` state dicts of the
whole classifier), a plain state dict, or a folder holding `model.safetensors`; the classifier keys are
dropped and every feature-extractor weight must be found with the right shape.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import timm
import torch
from torch import nn

from distill.engine.checkpoint import CheckpointMismatch, describe_mismatch
from distill.errors import ConfigError
from distill.models.factory import IMAGENET_MEAN, IMAGENET_STD, hub_download_order, read_state_dict

_FEATURE_SOURCES: dict[str, Callable[..., nn.Module]] = {}


def register_feature_source(prefix: str):
    def wrap(fn):
        _FEATURE_SOURCES[prefix] = fn
        return fn

    return wrap


def _split(name: str) -> tuple[str, str]:
    source, _, model = name.rpartition("/")
    return (source, model) if source in _FEATURE_SOURCES else ("timm", name)


def _indices_for_strides(available: Sequence[int], out_strides: Sequence[int], name: str) -> list[int]:
    """For each wanted stride, the deepest feature whose reduction is that stride."""
    indices = []
    for stride in out_strides:
        found = [i for i, r in enumerate(available) if r == stride]
        if not found:
            raise ConfigError(f"{name} has no feature map at stride {stride} (it has strides {list(available)})")
        indices.append(found[-1])
    return indices


@register_feature_source("timm")
def _timm_features(name: str, pretrained: bool, out_strides: Sequence[int]) -> nn.Module:
    with torch.device("meta"):  # only to read feature_info: no memory, no weights
        probe = timm.create_model(name, features_only=True)
    indices = _indices_for_strides(probe.feature_info.reduction(), out_strides, name)
    model = timm.create_model(name, features_only=True, out_indices=indices, pretrained=pretrained)
    model.channels = list(model.feature_info.channels())
    model.strides = list(model.feature_info.reduction())
    return model


class SequentialStages(nn.Module):
    """The named children of a torchvision classifier run in order; the outputs of the chosen ones are
    returned. Child names stay torchvision's, so the classifier's weights load by name."""

    def __init__(self, net: nn.Module, stage_names: Sequence[str], out_strides: Sequence[int], name: str):
        super().__init__()
        for stage in stage_names:
            self.add_module(stage, getattr(net, stage))
        # strides and channels of every stage, measured on a dummy input
        size = 256
        x = torch.zeros(1, 3, size, size)
        measured = []
        with torch.no_grad():
            for stage in stage_names:
                x = getattr(self, stage)(x)
                measured.append((size // x.shape[-1], x.shape[1]))
        indices = _indices_for_strides([s for s, _ in measured], out_strides, name)
        self.stage_names = list(stage_names[: indices[-1] + 1])  # later stages are not needed
        self.out_positions = indices
        for stage in stage_names[indices[-1] + 1:]:
            delattr(self, stage)
        self.strides = [measured[i][0] for i in indices]
        self.channels = [measured[i][1] for i in indices]
        self.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": (3, 224, 224)}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, stage in enumerate(self.stage_names):
            x = getattr(self, stage)(x)
            if i in self.out_positions:
                outs.append(x)
        return outs


# torchvision families and their stages in order (everything before global pooling)
TORCHVISION_STAGES: dict[str, tuple[str, ...]] = {
    "shufflenet_v2": ("conv1", "maxpool", "stage2", "stage3", "stage4"),
}


@register_feature_source("torchvision")
def _torchvision_features(name: str, pretrained: bool, out_strides: Sequence[int]) -> nn.Module:
    import torchvision

    family = next((f for f in TORCHVISION_STAGES if name.startswith(f)), None)
    if family is None:
        raise ConfigError(f"torchvision/{name}: no feature stages known (known families: {sorted(TORCHVISION_STAGES)})")
    net = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
    return SequentialStages(net, TORCHVISION_STAGES[family], out_strides, f"torchvision/{name}")


def _normalise_key(key: str) -> str:
    # timm's FeatureListNet flattens `stages.0` into `stages_0`; compare keys with both separators equal
    return key.replace("_", ".")


def load_feature_weights(model: nn.Module, checkpoint: str | Path, name: str = "backbone") -> None:
    """Load a classifier checkpoint into a feature extractor by name; the head's keys are ignored, any
    extractor weight that is missing or mis-shaped raises `CheckpointMismatch` naming it."""
    state = read_state_dict(checkpoint)
    by_normalised: dict[str, list[str]] = {}
    for key in state:
        by_normalised.setdefault(_normalise_key(key), []).append(key)
    mapped = {}
    for key in model.state_dict():
        if key in state:
            mapped[key] = state[key]
        elif len(candidates := by_normalised.get(_normalise_key(key), [])) == 1:
            mapped[key] = state[candidates[0]]
    problem = describe_mismatch(model, mapped)
    if problem:
        raise CheckpointMismatch(f"checkpoint {checkpoint} does not fit the {name} feature extractor:\n{problem}")
    model.load_state_dict(mapped)


def create_feature_extractor(
    name: str,
    pretrained: bool = False,
    checkpoint: Optional[str] = None,
    out_strides: Sequence[int] = (8, 16, 32),
) -> nn.Module:
    """A backbone returning `len(out_strides)` maps; `.channels` / `.strides` describe them. With a `checkpoint`
    the hub's weights are not fetched: the checkpoint's replace them."""
    source, model_name = _split(name)
    pretrained = pretrained and not checkpoint
    try:
        with hub_download_order(pretrained):
            model = _FEATURE_SOURCES[source](model_name, pretrained, tuple(out_strides))
    except (RuntimeError, ValueError) as e:  # timm: RuntimeError, torchvision: ValueError
        if "Unknown model" in str(e):
            raise ConfigError(f"unknown model {name!r} (timm.list_models() lists timm's; "
                              f"torchvision's are named torchvision/<name>)") from None
        if "No pretrained weights" in str(e):
            raise ConfigError(f"{name!r} has no pretrained weights to fetch: set model.pretrained_backbone=false "
                              f"(random) or model.backbone_checkpoint=...") from None
        if isinstance(e, ValueError):  # a malformed name or arguments the model does not take
            raise ConfigError(f"cannot build model {name!r}: {e}") from None
        raise
    except OSError as e:  # hub weights out of reach (no network, or offline mode)
        raise ConfigError(f"cannot fetch the pretrained weights of {name!r}: {e}") from None
    if checkpoint:
        load_feature_weights(model, checkpoint, name)
    return model
