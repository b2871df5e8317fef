"""RT-DETR's decoder: IoU-aware query selection from the encoder memory, then layers of self-attention,
multi-scale deformable cross-attention and FFN with iterative box refinement.

Query selection: every memory position gets an anchor (its cell centre, size 0.05·2^level, in logit space;
anchors too close to the border are invalid), a class score and a box (anchor + delta). The top
`num_queries` positions by best class score start the decoder with their content and box detached; their
own predictions get a loss too (`enc_outputs`).

Refinement: each layer predicts a delta added to the previous box in inverse-sigmoid space; the reference
box is detached between layers, while the training-time box of layer i > 0 is computed from the undetached
previous box so that each head also learns from the next layer's error (DINO's "look forward twice").
In eval only the last layer's class head runs and no Python control flow depends on data.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from distill.detection.box_ops import inverse_sigmoid
from distill.detection.deformable_attention import MSDeformableAttention
from distill.detection.denoising import build_denoising_queries


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x


def generate_anchors(spatial_shapes: Sequence[tuple[int, int]], base_size: float = 0.05, eps: float = 0.01,
                     device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors (1, S, 4) as logits of cxcywh, and validity (1, S, 1): all coordinates inside (eps, 1 - eps)."""
    anchors = []
    for level, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
        centres = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1).reshape(-1, 2)  # no host data: no copy
        sizes = torch.full_like(centres, base_size * 2.0 ** level)
        anchors.append(torch.cat([centres, sizes], -1))
    anchors = torch.cat(anchors)[None]
    valid = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
    return inverse_sigmoid(anchors).to(dtype), valid


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, dim_feedforward: int, dropout: float, num_levels: int,
                 num_points: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = MSDeformableAttention(dim, num_heads, num_levels, num_points)
        self.ffn = nn.Sequential(nn.Linear(dim, dim_feedforward), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(dim_feedforward, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, query_pos, ref_boxes, memory, spatial_shapes, attn_mask=None):
        q = k = queries + query_pos
        attended = self.self_attn(q, k, queries, attn_mask=attn_mask, need_weights=False)[0]
        queries = self.norm1(queries + self.dropout(attended))
        sampled = self.cross_attn(queries + query_pos, ref_boxes, memory, spatial_shapes)
        queries = self.norm2(queries + self.dropout(sampled))
        return self.norm3(queries + self.dropout(self.ffn(queries)))


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class QuerySelection:
    """IoU-aware query selection, shared by the decoder heads: needs `enc_output`, `enc_score_head`,
    `enc_bbox_head` and `num_queries` on the module, and `init_eval_anchors` called in its constructor."""

    def init_eval_anchors(self, strides: Sequence[int], eval_spatial_size: Optional[tuple[int, int]]) -> None:
        self.eval_shapes = None
        if eval_spatial_size is not None:  # fixed anchors for export: constants instead of a subgraph
            h, w = eval_spatial_size
            self.eval_shapes = [(h // s, w // s) for s in strides]
            anchors, valid = generate_anchors(self.eval_shapes)
            self.register_buffer("eval_anchors", anchors, persistent=False)
            self.register_buffer("eval_valid", valid, persistent=False)

    def anchors(self, spatial_shapes, memory):
        if not self.training and self.eval_shapes == list(spatial_shapes):
            return self.eval_anchors.to(memory.dtype), self.eval_valid
        return generate_anchors(spatial_shapes, device=memory.device, dtype=memory.dtype)

    def start_queries(self, feats: Sequence[torch.Tensor], targets: Optional[list[dict]]):
        """The decoder's input: the projected maps as one memory, and the selected queries (content, box logits)
        with the denoising queries in front of them in training; also `select_queries`' encoder predictions and
        the denoising group (or None). Needs `input_proj` and the denoising settings on the module too."""
        maps = [proj(f) for proj, f in zip(self.input_proj, feats)]
        spatial_shapes = [(int(m.shape[2]), int(m.shape[3])) for m in maps]
        memory = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        content, box_logits, enc_outputs = self.select_queries(memory, spatial_shapes)
        dn = None
        if self.training and targets is not None and self.num_denoising > 0:
            dn = build_denoising_queries(targets, self.denoising_class_embed, self.num_classes, self.num_queries,
                                         self.num_denoising, self.label_noise_ratio, self.box_noise_scale)
            content = torch.cat([dn.content.to(content.dtype), content], dim=1)
            box_logits = torch.cat([dn.boxes_logit.to(box_logits.dtype), box_logits], dim=1)
        return memory, spatial_shapes, content, box_logits, enc_outputs, dn

    def select_queries(self, memory, spatial_shapes):
        """Top-K memory positions by best class score: (content, box logits, their encoder predictions)."""
        anchors, valid = self.anchors(spatial_shapes, memory)
        enc_memory = self.enc_output(memory * valid.to(memory.dtype))
        enc_logits = self.enc_score_head(enc_memory)
        enc_box_logits = self.enc_bbox_head(enc_memory) + anchors
        if memory.shape[1] < self.num_queries:
            raise ValueError(f"the feature maps {list(spatial_shapes)} hold {memory.shape[1]} positions, fewer than "
                             f"num_queries={self.num_queries}: use larger images or fewer queries")
        scores = enc_logits.max(-1).values.masked_fill(~valid.squeeze(-1), float("-inf"))
        index = scores.topk(self.num_queries, dim=1).indices
        box_logits = _gather(enc_box_logits, index)
        enc_outputs = None
        if self.training:  # the encoder's own predictions only feed the loss
            enc_outputs = {"pred_logits": _gather(enc_logits, index), "pred_boxes": box_logits.sigmoid()}
        return _gather(enc_memory, index).detach(), box_logits.detach(), enc_outputs


class RTDETRDecoder(QuerySelection, nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: Sequence[int],
        strides: Sequence[int],
        hidden_dim: int = 256,
        num_queries: int = 300,
        num_layers: int = 3,
        num_heads: int = 8,
        num_points: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        eval_spatial_size: Optional[tuple[int, int]] = None,
    ):
        super().__init__()
        self.num_classes, self.num_queries = num_classes, num_queries
        self.num_denoising = num_denoising
        self.label_noise_ratio, self.box_noise_scale = label_noise_ratio, box_noise_scale
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim)) for c in in_channels)
        self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_dim, num_heads, dim_feedforward, dropout, len(in_channels), num_points)
            for _ in range(num_layers))
        self.score_heads = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.bbox_heads = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(num_layers))
        self.init_eval_anchors(strides, eval_spatial_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        prior = -math.log((1 - 0.01) / 0.01)  # class scores start at probability 0.01
        for head in [self.enc_score_head, *self.score_heads]:
            nn.init.constant_(head.bias, prior)
        for mlp in [self.enc_bbox_head, *self.bbox_heads]:  # boxes start at the anchor / previous box
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)

    def forward(self, feats: Sequence[torch.Tensor], targets: Optional[list[dict]] = None) -> dict:
        memory, spatial_shapes, content, box_logits, enc_outputs, dn = self.start_queries(feats, targets)
        attn_mask = dn.attn_mask if dn is not None else None

        ref = ref_detached = box_logits.sigmoid()
        queries = content
        all_logits, all_boxes = [], []
        for i, layer in enumerate(self.layers):
            queries = layer(queries, self.query_pos_head(ref_detached), ref_detached, memory, spatial_shapes, attn_mask)
            delta = self.bbox_heads[i](queries)
            refined = (delta + inverse_sigmoid(ref_detached)).sigmoid()
            if self.training:
                all_logits.append(self.score_heads[i](queries))
                all_boxes.append(refined if i == 0 else (delta + inverse_sigmoid(ref)).sigmoid())
            ref, ref_detached = refined, refined.detach()

        if not self.training:
            return {"pred_logits": self.score_heads[-1](queries), "pred_boxes": refined}

        split = dn.num_denoising if dn is not None else 0
        layers = [{"pred_logits": lg[:, split:], "pred_boxes": bx[:, split:]} for lg, bx in zip(all_logits, all_boxes)]
        out = {**layers[-1], "aux_outputs": layers[:-1], "enc_outputs": [enc_outputs]}
        if dn is not None:
            out["dn_outputs"] = [{"pred_logits": lg[:, :split], "pred_boxes": bx[:, :split]}
                                 for lg, bx in zip(all_logits, all_boxes)]
            out["dn_meta"] = {"positive_idx": dn.positive_idx, "groups": dn.groups, "num_denoising": dn.num_denoising}
        return out
