"""The trainable heads that carry the student's feature maps into the teacher's channels.

One head per student level: a 1x1 convolution to the teacher map's channel count, then batch norm (a well
scaled output from the first step, whatever the student's activations). They exist for training only. They
sit on the student as its `feature_heads` submodule, so the optimiser, DDP, the checkpoint and an exact resume
treat them as the student's own weights; everything that takes a student's weights out of a run (export,
`read_state_dict`) drops them with `without_projection_heads`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

HEADS = "feature_heads"  # the student's submodule holding the heads


class ProjectionHeads(nn.Module):
    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]):
        super().__init__()
        if len(in_channels) != len(out_channels):
            raise ValueError(f"{len(in_channels)} student maps but {len(out_channels)} targets")
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out))
            for c_in, c_out in zip(in_channels, out_channels)
        )

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [head(x) for head, x in zip(self.heads, maps)]


def attach_projection_heads(student: nn.Module, heads: ProjectionHeads) -> ProjectionHeads:
    student.add_module(HEADS, heads)
    return heads


def without_projection_heads(state: dict) -> dict:
    """A student state dict without the training-only projection heads."""
    prefix = HEADS + "."
    return {k: v for k, v in state.items() if not k.startswith(prefix)}
