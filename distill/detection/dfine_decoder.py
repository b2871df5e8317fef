"""D-FINE's decoder head (Peng et al. 2024): RT-DETR's query selection and denoising, with boxes refined as
distributions (Fine-grained Distribution Refinement, see `distill.detection.distribution`).

After the first layer a plain box head (`pre_bbox_head`, as RT-DETR's) gives the initial boxes; from then
on every layer adds its logits to the previous layer's edge-distance logits ("corners"), and the boxes are
the initial boxes moved by the expected distances. Refinement is relative to that one initial box, so the
corners of all layers share one target. The box head of layer i reads its own output plus layer i-1's
(detached). Class scores get a location-quality term (LQE) from the sharpness of the corner distributions.

The layers differ from RT-DETR's: cross-attention without value / output projections and with its own
point count per level, a learned gate in place of the residual after it, and query position embeddings
clamped to ±10. Denoising and top-K selection are RT-DETR's (`distill.detection.denoising`,
`QuerySelection`); as in the rest of this project, positions whose anchors lie too close to the border are
never selected (the reference can pick them, with an infinite anchor, when they score high).

In training the outputs carry, besides RT-DETR's, `pred_corners` and `ref_points` (the initial boxes) per
layer, and `pre_outputs` / `dn_pre_outputs` (the first layer's plain-head boxes): `DFINECriterion` needs
them. In eval only the last layer's boxes and scores come out.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from distill.detection.box_ops import inverse_sigmoid
from distill.detection.decoder import MLP, QuerySelection
from distill.detection.deformable_attention import DeformableSampling
from distill.detection.distribution import DEFAULT_UP, distance_to_box, integral, weighting_function


class Gate(nn.Module):
    """norm(g1 · x + g2 · y) with per-channel sigmoid gates from both inputs; starts as norm((x + y) / 2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(2 * dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)  # sigmoid(0) = 0.5

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g1, g2 = torch.sigmoid(self.gate(torch.cat([x, y], -1))).chunk(2, dim=-1)
        return self.norm(g1 * x + g2 * y)


class LocationQuality(nn.Module):
    """LQE: a score correction from each edge's top-k bin probabilities and their mean; starts at zero."""

    def __init__(self, reg_max: int, k: int = 4, hidden_dim: int = 64):
        super().__init__()
        self.k, self.bins = k, reg_max + 1
        self.mlp = MLP(4 * (k + 1), hidden_dim, 1, 2)
        nn.init.zeros_(self.mlp.layers[-1].weight)
        nn.init.zeros_(self.mlp.layers[-1].bias)

    def forward(self, logits: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        prob = corners.reshape(*corners.shape[:-1], 4, self.bins).softmax(-1)
        top = prob.topk(self.k, dim=-1).values
        stats = torch.cat([top, top.mean(-1, keepdim=True)], -1).flatten(-2)
        return logits + self.mlp(stats)


class DFineDecoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, dim_feedforward: int, dropout: float,
                 points_per_level: Sequence[int]):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = DeformableSampling(dim, num_heads, points_per_level)
        self.gateway = Gate(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim_feedforward), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(dim_feedforward, dim))
        self.norm1, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.ffn[0].weight)
        nn.init.xavier_uniform_(self.ffn[3].weight)

    def forward(self, queries, query_pos, ref_boxes, memory, spatial_shapes, attn_mask=None):
        q = k = queries + query_pos
        attended = self.self_attn(q, k, queries, attn_mask=attn_mask, need_weights=False)[0]
        queries = self.norm1(queries + self.dropout(attended))
        sampled = self.cross_attn(queries + query_pos, ref_boxes, memory, spatial_shapes)
        queries = self.gateway(queries, self.dropout(sampled))
        queries = queries + self.dropout(self.ffn(queries))
        return self.norm3(queries.clamp(-65504, 65504))  # finite in fp16


class DFineDecoder(QuerySelection, nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: Sequence[int],
        strides: Sequence[int],
        hidden_dim: int = 256,
        num_queries: int = 300,
        num_layers: int = 3,
        num_heads: int = 8,
        points_per_level: Sequence[int] = (4, 4, 4),
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        eval_spatial_size: Optional[tuple[int, int]] = None,
        reg_max: int = 32,
        reg_scale: float = 4.0,
    ):
        super().__init__()
        if len(points_per_level) != len(in_channels):
            raise ValueError(f"points_per_level {list(points_per_level)} needs one entry per level "
                             f"({len(in_channels)} levels)")
        self.num_classes, self.num_queries = num_classes, num_queries
        self.num_denoising = num_denoising
        self.label_noise_ratio, self.box_noise_scale = label_noise_ratio, box_noise_scale
        self.reg_max, self.reg_scale = reg_max, reg_scale
        # W(n) is fixed (the reference keeps up and reg_scale as frozen parameters)
        self.register_buffer("project", weighting_function(reg_max, DEFAULT_UP, reg_scale), persistent=False)
        # the encoder's maps already have the decoder's width: the reference projects only when they do not
        self.input_proj = nn.ModuleList(
            nn.Identity() if c == hidden_dim else
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim)) for c in in_channels)
        self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2)
        self.layers = nn.ModuleList(
            DFineDecoderLayer(hidden_dim, num_heads, dim_feedforward, dropout, points_per_level)
            for _ in range(num_layers))
        self.score_heads = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.bbox_heads = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4 * (reg_max + 1), 3) for _ in range(num_layers))
        self.lqe_layers = nn.ModuleList(LocationQuality(reg_max) for _ in range(num_layers))
        self.init_eval_anchors(strides, eval_spatial_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        prior = -math.log((1 - 0.01) / 0.01)  # class scores start at probability 0.01
        for head in [self.enc_score_head, *self.score_heads]:
            nn.init.constant_(head.bias, prior)
        # boxes start at the anchor (encoder), the selected box (first layer), zero distances (corners)
        for mlp in [self.enc_bbox_head, self.pre_bbox_head, *self.bbox_heads]:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        for proj in self.input_proj:
            if isinstance(proj, nn.Sequential):
                nn.init.xavier_uniform_(proj[0].weight)

    def forward(self, feats: Sequence[torch.Tensor], targets: Optional[list[dict]] = None) -> dict:
        memory, spatial_shapes, content, box_logits, enc_outputs, dn = self.start_queries(feats, targets)
        attn_mask = dn.attn_mask if dn is not None else None

        ref = box_logits.sigmoid()
        queries = content
        previous_queries = previous_corners = 0
        layers = []
        for i, layer in enumerate(self.layers):
            query_pos = self.query_pos_head(ref).clamp(min=-10, max=10)
            queries = layer(queries, query_pos, ref, memory, spatial_shapes, attn_mask)
            if i == 0:
                pre_boxes = (self.pre_bbox_head(queries) + inverse_sigmoid(ref)).sigmoid()
                pre_logits = self.score_heads[0](queries)
                initial = pre_boxes.detach()
            corners = self.bbox_heads[i](queries + previous_queries) + previous_corners
            boxes = distance_to_box(initial, integral(corners, self.project), self.reg_scale)
            if self.training or i == len(self.layers) - 1:
                logits = self.lqe_layers[i](self.score_heads[i](queries), corners)
                layers.append({"pred_logits": logits, "pred_boxes": boxes, "pred_corners": corners,
                               "ref_points": initial})
            previous_corners, previous_queries = corners, queries.detach()
            ref = boxes.detach()

        if not self.training:
            return {"pred_logits": layers[-1]["pred_logits"], "pred_boxes": layers[-1]["pred_boxes"]}

        split = dn.num_denoising if dn is not None else 0
        matched = [{k: v[:, split:] for k, v in out.items()} for out in layers]
        out = {**matched[-1], "aux_outputs": matched[:-1], "enc_outputs": [enc_outputs],
               "pre_outputs": {"pred_logits": pre_logits[:, split:], "pred_boxes": pre_boxes[:, split:]}}
        if dn is not None:
            out["dn_outputs"] = [{k: v[:, :split] for k, v in layer.items()} for layer in layers]
            out["dn_pre_outputs"] = {"pred_logits": pre_logits[:, :split], "pred_boxes": pre_boxes[:, :split]}
            out["dn_meta"] = {"positive_idx": dn.positive_idx, "groups": dn.groups, "num_denoising": dn.num_denoising}
        return out
