"""RT-DETR's hybrid encoder: per-level 1x1 projection, attention on the coarsest map only (intra-scale), then
the CCFM cross-scale fusion: a top-down path (1x1 lateral, nearest x2, concat, fusion block) and a bottom-up
path (stride-2 downsample, concat, fusion block). Which fusion block, downsample and attention are used is
picked by name from `distill.detection.blocks`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.detection.blocks import DOWNSAMPLES, ENCODER_ATTENTIONS, ConvNormAct, fusion_layer, lookup


class HybridEncoder(nn.Module):
    def __init__(
        self,
        in_channels: Sequence[int],
        hidden_dim: int = 256,
        expansion: float = 0.5,
        depth_mult: float = 1.0,
        fusion_block: str = "csp_repvgg",
        downsample: str = "conv",
        attention: str = "aifi",
        num_heads: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
    ):
        super().__init__()
        levels = len(in_channels)
        units = max(round(3 * depth_mult), 1)
        make_downsample = lookup(DOWNSAMPLES, downsample, "downsample")
        self.hidden_dim = hidden_dim
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim)) for c in in_channels
        )
        self.attention = lookup(ENCODER_ATTENTIONS, attention, "encoder attention")(
            hidden_dim, num_heads, dim_feedforward, dropout)
        # index i of the top-down modules fuses level (levels - 2 - i) with the path from above
        # D-FINE's neck (its fusion layer, rep_elan) also drops the lateral convs' activation
        lateral_act = None if fusion_block == "rep_elan" else nn.SiLU
        self.lateral = nn.ModuleList(ConvNormAct(hidden_dim, hidden_dim, 1, act=lateral_act) for _ in range(levels - 1))
        self.top_down = nn.ModuleList(
            fusion_layer(fusion_block, hidden_dim, expansion, units) for _ in range(levels - 1))
        self.downsample = nn.ModuleList(make_downsample(hidden_dim) for _ in range(levels - 1))
        self.bottom_up = nn.ModuleList(
            fusion_layer(fusion_block, hidden_dim, expansion, units) for _ in range(levels - 1))

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        maps = [proj(f) for proj, f in zip(self.input_proj, feats)]
        maps[-1] = self.attention(maps[-1])

        # top-down: coarse to fine; the lateral output also feeds the bottom-up path at its level
        from_above = maps[-1]
        inner = [None] * len(maps)
        for i, level in enumerate(range(len(maps) - 2, -1, -1)):
            from_above = self.lateral[i](from_above)
            inner[level + 1] = from_above
            up = F.interpolate(from_above, scale_factor=2.0, mode="nearest")
            from_above = self.top_down[i](torch.cat([up, maps[level]], dim=1))
        inner[0] = from_above

        # bottom-up: fine to coarse
        outs = [inner[0]]
        for i in range(len(maps) - 1):
            down = self.downsample[i](outs[-1])
            outs.append(self.bottom_up[i](torch.cat([down, inner[i + 1]], dim=1)))
        return outs
