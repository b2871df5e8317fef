"""Multi-scale deformable attention (Deformable DETR), RT-DETRv2 form, on `F.grid_sample` only (no compiled
extension, exports to ONNX).

Each query looks at `num_points` locations per level and head around its reference box: the sampling
offsets are scaled by the box's width and height (v2: offset / num_points * box_wh * 0.5), and the sampled
values are mixed with weights softmaxed jointly over all levels and points of a head. `DeformableSampling` is
D-FINE's variant: no value / output projections, a point count per level.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def deformable_attention_core(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value (B, S, heads, D) with S = Σ h·w over levels; sampling_locations (B, Q, heads, levels, points, 2)
    as (x, y) in 0..1; attention_weights (B, Q, heads, levels, points) → (B, Q, heads·D).
    Bilinear sampling with zeros outside the map, pixel centres at (i + 0.5) / size."""
    b, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    values = value.permute(0, 2, 3, 1).flatten(0, 1).split([h * w for h, w in spatial_shapes], dim=-1)
    grids = (2 * sampling_locations - 1).permute(0, 2, 1, 3, 4, 5).flatten(0, 1)  # (B·heads, Q, L, P, 2)
    sampled = [
        F.grid_sample(values[lvl].reshape(b * heads, dim, h, w), grids[:, :, lvl], mode="bilinear",
                      padding_mode="zeros", align_corners=False)  # (B·heads, D, Q, P)
        for lvl, (h, w) in enumerate(spatial_shapes)
    ]
    weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(b * heads, 1, queries, levels * points)
    out = (torch.cat(sampled, dim=-1) * weights).sum(-1)  # (B·heads, D, Q)
    return out.reshape(b, heads * dim, queries).transpose(1, 2)


def head_rays(num_heads: int) -> torch.Tensor:
    """(num_heads, 2) directions spread evenly around the circle, scaled so the longer component is 1."""
    angles = torch.arange(num_heads, dtype=torch.float32) * (2 * math.pi / num_heads)
    rays = torch.stack([angles.cos(), angles.sin()], -1)
    return rays / rays.abs().max(-1, keepdim=True).values


class MSDeformableAttention(nn.Module):
    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 3, num_points: int = 4,
                 offset_scale: float = 0.5):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.offset_scale = offset_scale
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # offsets start on rays in each head's own direction, point k at distance k: a spread-out initial pattern
        nn.init.zeros_(self.sampling_offsets.weight)
        rays = head_rays(self.num_heads)
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = rays.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1) * steps
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_boxes: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """query (B, Q, C); reference_boxes (B, Q, 4) cxcywh in 0..1; value (B, S, C) flattened levels."""
        b, queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value).reshape(b, value.shape[1], heads, -1)
        offsets = self.sampling_offsets(query).reshape(b, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).reshape(b, queries, heads, levels * points).softmax(-1)
        weights = weights.reshape(b, queries, heads, levels, points)
        centre = reference_boxes[:, :, None, None, None, :2]
        size = reference_boxes[:, :, None, None, None, 2:]
        locations = centre + offsets / points * size * self.offset_scale
        return self.output_proj(deformable_attention_core(value, spatial_shapes, locations, weights))


class DeformableSampling(nn.Module):
    """D-FINE's cross-attention: the same sampling as `MSDeformableAttention`, with its own number of points
    per level (D-FINE-S: [3, 6, 3]) and without value and output projections: the heads read the memory
    channels directly, split `num_heads` ways. Offsets are scaled by 1 / (that level's points)."""

    def __init__(self, embed_dim: int, num_heads: int, points_per_level: Sequence[int], offset_scale: float = 0.5):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.points_per_level = num_heads, list(points_per_level)
        self.offset_scale = offset_scale
        total = sum(self.points_per_level)
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * total * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * total)
        scale = [1.0 / n for n in self.points_per_level for _ in range(n)]
        self.register_buffer("point_scale", torch.tensor(scale).view(total, 1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # as MSDeformableAttention: rays in each head's direction, point k of a level at distance k
        nn.init.zeros_(self.sampling_offsets.weight)
        rays = head_rays(self.num_heads)
        steps = torch.cat([torch.arange(1, n + 1, dtype=torch.float32) for n in self.points_per_level])
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((rays[:, None, :] * steps[None, :, None]).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def forward(self, query: torch.Tensor, reference_boxes: torch.Tensor, value: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """query (B, Q, C); reference_boxes (B, Q, 4) cxcywh in 0..1; value (B, S, C) flattened levels."""
        b, queries, channels = query.shape
        heads, total = self.num_heads, sum(self.points_per_level)
        offsets = self.sampling_offsets(query).reshape(b, queries, heads, total, 2)
        weights = self.attention_weights(query).reshape(b, queries, heads, total).softmax(-1)
        centre = reference_boxes[:, :, None, None, :2]
        size = reference_boxes[:, :, None, None, 2:]
        locations = centre + offsets * self.point_scale.to(query.dtype) * size * self.offset_scale

        dim = channels // heads
        values = value.reshape(b, value.shape[1], heads, dim).permute(0, 2, 3, 1).flatten(0, 1)
        values = values.split([h * w for h, w in spatial_shapes], dim=-1)
        grids = (2 * locations - 1).permute(0, 2, 1, 3, 4).flatten(0, 1).split(self.points_per_level, dim=-2)
        sampled = [
            F.grid_sample(values[lvl].reshape(b * heads, dim, h, w), grids[lvl], mode="bilinear",
                          padding_mode="zeros", align_corners=False)  # (B·heads, D, Q, points of the level)
            for lvl, (h, w) in enumerate(spatial_shapes)
        ]
        weights = weights.permute(0, 2, 1, 3).reshape(b * heads, 1, queries, total)
        out = (torch.cat(sampled, dim=-1) * weights).sum(-1)  # (B·heads, D, Q)
        return out.reshape(b, heads * dim, queries).transpose(1, 2)
