"""The deploy form of a detector: the same function in fewer, cheaper operations, for inference and export.

- re-parameterised blocks collapse to single convolutions: the neck's RepVGG units (3x3 + 1x1 branches
  with their batch norms → one 3x3 conv) and the backbone's own (RepViT's, through timm's
  `reparameterize_model`);
- every remaining batch norm that directly follows a convolution is folded into that convolution's
  weight and bias (timm's norm + activation layers keep their activation).

Which batch norm follows which convolution is read from one forward pass (hooks), not from names, so any
backbone works; the folded model's feature maps are then checked against the original's, and a
mismatch raises instead of exporting a wrong model. Eval mode only: folding freezes batch statistics.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn


def _probe_side(model: nn.Module) -> int:
    """The smallest side (a multiple of the largest stride) whose maps hold at least `num_queries` positions."""
    strides, queries = model.backbone.strides, model.cfg.num_queries
    side = model.max_stride
    while sum((side // s) ** 2 for s in strides) < queries:
        side += model.max_stride
    return side


def _memory(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Everything up to the decoder's input projections: the part of the detector batch norms live in."""
    return [proj(f) for proj, f in zip(model.decoder.input_proj, model.encoder(model.backbone(x)))]


def _norm_replacement(norm: nn.BatchNorm2d) -> nn.Module:
    """What stays of a folded norm: nothing, or the activation (and dropout) of timm's BatchNormAct2d."""
    act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
    return nn.Sequential(drop, act) if act is not None and drop is not None else nn.Identity()


@torch.no_grad()
def fold_batch_norms(model: nn.Module, example: torch.Tensor) -> int:
    """Fold every BatchNorm2d whose input is the output of a Conv2d read by nothing else; returns the count."""
    produced: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}
    readers: Counter = Counter()
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d, int]] = []

    def after_conv(module, _inputs, output):
        produced[id(output)] = (module, output)  # the tensor is kept alive, so its id stays unique

    def before_any(module, inputs):
        for t in inputs:
            if torch.is_tensor(t) and id(t) in produced:
                readers[id(t)] += 1
                if isinstance(module, nn.BatchNorm2d):
                    pairs.append((produced[id(t)][0], module, id(t)))

    handles = [m.register_forward_pre_hook(before_any) for m in model.modules()]
    handles += [m.register_forward_hook(after_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()

    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    folded = 0
    for conv, norm, tensor_id in pairs:
        if readers[tensor_id] != 1 or id(norm) not in parents:
            continue
        scale = norm.running_var.add(norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale + (norm.bias if norm.bias is not None else 0)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        conv.bias = nn.Parameter(bias * scale + shift)
        parent, name = parents[id(norm)]
        setattr(parent, name, _norm_replacement(norm))
        folded += 1
    return folded


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside are of `dtype`: timm's re-parameterisation builds its fused convolutions in the
    default dtype, which would otherwise round a float64 (or bf16) model's fused weights to float32."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@torch.no_grad()
def deploy_form(model: nn.Module, probe_side: Optional[int] = None, atol: float = 1e-4) -> nn.Module:
    """`model` (an RT-DETR) in its deploy form, in place and in eval mode; raises if its maps changed."""
    from timm.utils.model import reparameterize_model

    model.eval()
    side = probe_side or _probe_side(model)
    probe = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    first = next(model.parameters())
    probe = probe.to(first.device, first.dtype)
    before = _memory(model, probe)
    with _default_dtype(first.dtype):
        model.reparameterize()  # the neck's RepVGG units
        reparameterize_model(model.backbone, inplace=True)  # the backbone's own (RepViT), by timm's convention
    fold_batch_norms(model, probe)
    after = _memory(model, probe)
    for level, (a, b) in enumerate(zip(before, after)):
        error = (a - b).abs().max().item()
        if error > atol * max(1.0, b.abs().max().item()):
            raise RuntimeError(f"the deploy form changed the decoder's input at level {level} by {error:.3g}")
    return model
