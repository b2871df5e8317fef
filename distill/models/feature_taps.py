"""Feature maps read out of a classifier's own forward pass, at the layers timm's `features_only` would return.

A `FeatureTaps` object hooks the named layers of a model and, while `capturing()`, keeps their outputs as
(B, C, H, W) maps. Reading them from the classifier's forward (rather than from a second, `features_only`
model) keeps one set of weights and one pass for logits and maps: the student's logit path is untouched, and
the teacher's logits and maps come from the same view in one pass.

Where the layers are: timm's `feature_info` on the classifier (the same modules `features_only` returns, e.g.
MobileNetV4's `blocks.1/2/4` at strides 8/16/32), or for torchvision models the stage table of
`distill.models.features`, whose strides are measured. A ViT's layers are its blocks: their outputs are token
sequences, which are turned into maps here (prefix tokens dropped, patch tokens laid out row by row on the
patch grid, passed through the model's final norm as timm's `forward_intermediates(norm=True)` does).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from distill.errors import ConfigError


@dataclass(frozen=True)
class FeaturePoint:
    """One layer a map can be read from: its module's name, its channels and its stride (input side / map side)."""

    module: str
    channels: int
    stride: int


def feature_points(model: nn.Module, name: str) -> list[FeaturePoint]:
    """Every layer of `model` that timm's `features_only` (or this project's torchvision stage table) would
    return, shallow to deep. ConfigError when the model has none."""
    info = getattr(model, "feature_info", None)
    if info:
        entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        return [FeaturePoint(e["module"], int(e["num_chs"]), int(e["reduction"])) for e in entries]
    stages = torchvision_stages(model)
    if stages:
        return measured_points(model, stages)
    raise ConfigError(f"{name} has no feature maps to distil: it offers neither timm's features_only "
                      f"(feature_info) nor ViT patch tokens")


def torchvision_stages(model: nn.Module) -> Optional[tuple[str, ...]]:
    from distill.models.features import TORCHVISION_STAGES

    children = {n for n, _ in model.named_children()}
    return next((s for s in TORCHVISION_STAGES.values() if set(s) <= children), None)


def measured_points(model: nn.Module, stages: Sequence[str], side: int = 64) -> list[FeaturePoint]:
    """Channels and strides of the stages of a model with no `feature_info`, from one small forward."""
    points, x = [], torch.zeros(1, 3, side, side)
    with torch.no_grad():
        for stage in stages:
            x = getattr(model, stage)(x)
            points.append(FeaturePoint(stage, int(x.shape[1]), side // int(x.shape[-1])))
    return points


def points_at_strides(points: Sequence[FeaturePoint], strides: Sequence[int], name: str, key: str) -> list[FeaturePoint]:
    """For each stride, the deepest layer at that stride (as `features_only` picks them)."""
    chosen = []
    for stride in strides:
        found = [p for p in points if p.stride == stride]
        if not found:
            raise ConfigError(f"{key}: {name} has no feature map at stride {stride} "
                              f"(it has strides {sorted({p.stride for p in points})})")
        chosen.append(found[-1])
    return chosen


def points_at_indices(points: Sequence[FeaturePoint], indices: Sequence[int], name: str, key: str) -> list[FeaturePoint]:
    """The layers at `indices` of `feature_points` (negative counts from the deepest, as in Python)."""
    chosen = []
    for i in indices:
        if not -len(points) <= i < len(points):
            raise ConfigError(f"{key}: {name} has {len(points)} feature layers "
                              f"({', '.join(p.module for p in points)}); index {i} is outside them")
        chosen.append(points[i])
    return chosen


def tokens_to_map(tokens: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, prefix + H*W, C) tokens -> (B, C, H, W): the prefix (class, register) tokens dropped, patch k going
    to row k // W, column k % W (patches are embedded row by row)."""
    b, n, c = tokens.shape
    h, w = grid
    if n - num_prefix != h * w:
        raise ValueError(f"{n} tokens less {num_prefix} prefix tokens do not fill a {h}x{w} patch grid")
    return tokens[:, num_prefix:].reshape(b, h, w, c).permute(0, 3, 1, 2)


def is_token_model(model: nn.Module) -> bool:
    """A ViT-like model: patch embedding and prefix tokens; its blocks output token sequences."""
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


class _Keep:
    """The forward hook of one tapped layer. An object, not a closure: a deep copy of the model (the EMA's)
    then copies the taps with it instead of writing into the original's."""

    def __init__(self, taps: "FeatureTaps", index: int):
        self.taps, self.index = taps, index

    def __call__(self, module, args, output):
        if self.taps.active:
            self.taps.maps[self.index] = self.taps.as_map(output[0] if isinstance(output, (tuple, list)) else output)


class FeatureTaps:
    """Forward hooks on `points` of `model`: inside `capturing()`, each forward leaves the maps in `maps`
    (in the order of `points`). Outside it the hooks do nothing, so evaluation keeps nothing."""

    def __init__(self, model: nn.Module, points: Sequence[FeaturePoint]):
        self.points = list(points)
        self.tokens = is_token_model(model)
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.channels_last_output = getattr(model, "output_fmt", "NCHW") == "NHWC"  # timm's Swin-like stages
        self.norm = getattr(model, "norm", None) if self.tokens else None
        self.active = False
        self.maps: list[Optional[torch.Tensor]] = [None] * len(self.points)
        self._grid: tuple[int, int] = (0, 0)
        self._patch_embed = getattr(model, "patch_embed", None)
        modules = dict(model.named_modules())
        missing = [p.module for p in self.points if p.module not in modules]
        if missing:
            raise ConfigError(f"{type(model).__name__} names feature layers {missing} that its classifier does not have")
        if self.tokens:  # the patch grid follows the input's side
            model.register_forward_pre_hook(self._note_input)
        for i, point in enumerate(self.points):
            modules[point.module].register_forward_hook(_Keep(self, i))

    @property
    def channels(self) -> list[int]:
        return [p.channels for p in self.points]

    @property
    def strides(self) -> list[int]:
        return [p.stride for p in self.points]

    @contextmanager
    def capturing(self) -> Iterator[list]:
        self.active, self.maps = True, [None] * len(self.points)
        try:
            yield self.maps
        finally:  # the caller holds the maps now; the taps keep no reference to them (or to their graph)
            self.active, self.maps = False, [None] * len(self.points)

    def _note_input(self, module, args):
        if self.active:
            h, w = args[0].shape[-2:]
            pe = self._patch_embed
            self._grid = tuple(pe.dynamic_feat_size((h, w))) if hasattr(pe, "dynamic_feat_size") else \
                (h // pe.patch_size[0], w // pe.patch_size[1])

    def as_map(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens and x.dim() == 3:
            if self.norm is not None:
                x = self.norm(x)
            return tokens_to_map(x, self.num_prefix, self._grid)
        if self.channels_last_output:
            return x.permute(0, 3, 1, 2)
        return x
