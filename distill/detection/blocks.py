"""The swappable blocks of the hybrid encoder, each kind in its own registry.

- fusion blocks (the units inside the CCFM's CSP layers): `csp_repvgg` (RT-DETR: RepVGG 3x3 + 1x1),
  `uib` (MobileNetV4's inverted bottleneck: expand, depthwise, project), `extradw` (UIB with an extra
  depthwise conv before the expansion), `cib` (YOLOv10's compact inverted block);
- D-FINE's fusion layer `rep_elan` (`model.fusion_block=rep_elan`), which replaces the whole CSP layer: a
  GELAN-style split into two halves, two CSP layers of RepVGG units in a chain, all four concatenated;
- downsampling in the bottom-up path: `conv` (3x3 stride 2, RT-DETR), `scdown` (YOLOv10: pointwise for
  channels, then stride-2 depthwise for space) and `scdown_linear` (D-FINE's: the same, no activation);
- attention on the stride-32 map: `aifi` (RT-DETR: one transformer layer with a 2-D sine-cosine position
  embedding) and `psa` (YOLOv10: self-attention on half the channels, then a 1x1 fuse).

All units use the neck's activation (SiLU) and batch norm, so that a swap changes the block and nothing else.
Register a new block with `@register_fusion_unit("name")` etc.; lookups name the valid choices on a typo.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

FUSION_UNITS: dict[str, Callable[[int], nn.Module]] = {}
DOWNSAMPLES: dict[str, Callable[[int], nn.Module]] = {}
ENCODER_ATTENTIONS: dict[str, Callable[..., nn.Module]] = {}


def _register(registry: dict, name: str):
    def wrap(fn):
        registry[name] = fn
        return fn

    return wrap


def register_fusion_unit(name: str):
    return _register(FUSION_UNITS, name)


def register_downsample(name: str):
    return _register(DOWNSAMPLES, name)


def register_encoder_attention(name: str):
    return _register(ENCODER_ATTENTIONS, name)


def lookup(registry: dict, name: str, what: str) -> Callable:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; valid: {sorted(registry)}")
    return registry[name]


class ConvNormAct(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 act: Optional[type[nn.Module]] = nn.SiLU):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(out_ch)
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


# ------------------------------------------------------------------------------------------- fusion units


def _fuse_conv_norm(block: ConvNormAct) -> tuple[torch.Tensor, torch.Tensor]:
    norm = block.norm
    scale = norm.weight / (norm.running_var + norm.eps).sqrt()
    return block.conv.weight * scale.reshape(-1, 1, 1, 1), norm.bias - norm.running_mean * scale


class RepVGGUnit(nn.Module):
    """act(BN(3x3 conv) + BN(1x1 conv)); `reparameterize()` folds both into one 3x3 conv for inference."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3 = ConvNormAct(channels, channels, 3, act=None)
        self.conv1 = ConvNormAct(channels, channels, 1, act=None)
        self.act = nn.SiLU()
        self.fused: Optional[nn.Conv2d] = None

    def forward(self, x):
        if self.fused is not None:
            return self.act(self.fused(x))
        return self.act(self.conv3(x) + self.conv1(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.fused is not None:
            return
        w3, b3 = _fuse_conv_norm(self.conv3)
        w1, b1 = _fuse_conv_norm(self.conv1)
        self.fused = nn.Conv2d(w3.shape[1], w3.shape[0], 3, 1, 1, bias=True).to(w3)
        self.fused.weight.copy_(w3 + F.pad(w1, [1, 1, 1, 1]))
        self.fused.bias.copy_(b3 + b1)
        del self.conv3, self.conv1


class UniversalInvertedBottleneck(nn.Module):
    """MobileNetV4's UIB with a residual: [depthwise] → 1x1 expand → depthwise → 1x1 project.
    The leading depthwise conv is what makes it the ExtraDW form."""

    def __init__(self, channels: int, extra_dw: bool, expand_ratio: float = 4.0, kernel: int = 3):
        super().__init__()
        mid = int(channels * expand_ratio)
        self.start_dw = (ConvNormAct(channels, channels, kernel, groups=channels, act=None) if extra_dw
                         else nn.Identity())
        self.expand = ConvNormAct(channels, mid, 1)
        self.middle_dw = ConvNormAct(mid, mid, kernel, groups=mid)
        self.project = ConvNormAct(mid, channels, 1, act=None)

    def forward(self, x):
        return x + self.project(self.middle_dw(self.expand(self.start_dw(x))))


class CompactInvertedBlock(nn.Module):
    """YOLOv10's CIB with a residual: dw 3x3 → pw (x2) → dw 3x3 → pw → dw 3x3."""

    def __init__(self, channels: int, expand_ratio: float = 2.0):
        super().__init__()
        mid = int(channels * expand_ratio)
        self.body = nn.Sequential(
            ConvNormAct(channels, channels, 3, groups=channels),
            ConvNormAct(channels, mid, 1),
            ConvNormAct(mid, mid, 3, groups=mid),
            ConvNormAct(mid, channels, 1),
            ConvNormAct(channels, channels, 3, groups=channels),
        )

    def forward(self, x):
        return x + self.body(x)


register_fusion_unit("csp_repvgg")(RepVGGUnit)
register_fusion_unit("uib")(lambda c: UniversalInvertedBottleneck(c, extra_dw=False))
register_fusion_unit("extradw")(lambda c: UniversalInvertedBottleneck(c, extra_dw=True))
register_fusion_unit("cib")(CompactInvertedBlock)


class CSPLayer(nn.Module):
    """RT-DETR's CSP layer: two 1x1 branches, units on one, summed, then 1x1 to the output width."""

    def __init__(self, in_ch: int, out_ch: int, unit: str = "csp_repvgg", num_units: int = 3, expansion: float = 1.0):
        super().__init__()
        hidden = int(out_ch * expansion)
        make_unit = lookup(FUSION_UNITS, unit, "fusion block")
        self.conv1 = ConvNormAct(in_ch, hidden, 1)
        self.conv2 = ConvNormAct(in_ch, hidden, 1)
        self.units = nn.Sequential(*[make_unit(hidden) for _ in range(num_units)])
        self.conv3 = ConvNormAct(hidden, out_ch, 1) if hidden != out_ch else nn.Identity()

    def forward(self, x):
        return self.conv3(self.units(self.conv1(x)) + self.conv2(x))


class RepELAN(nn.Module):
    """D-FINE's fusion layer (its `RepNCSPELAN4`) from the 2·dim concatenation to dim: a 1x1 conv split into
    two halves; the second half runs through two CSP stages (RepVGG units, then a 3x3 conv) in a chain; the
    halves and both stages' outputs are concatenated and mixed by a 1x1 conv. The stages are
    round(expansion · dim / 2) wide. Attribute names follow transformers' `DFineRepNCSPELAN4`."""

    def __init__(self, dim: int, expansion: float, num_units: int):
        super().__init__()
        stage = round(expansion * dim // 2)
        self.conv1 = ConvNormAct(2 * dim, 2 * dim, 1)
        self.csp_rep1 = CSPLayer(dim, stage, "csp_repvgg", num_units, 1.0)
        self.conv2 = ConvNormAct(stage, stage, 3)
        self.csp_rep2 = CSPLayer(stage, stage, "csp_repvgg", num_units, 1.0)
        self.conv3 = ConvNormAct(stage, stage, 3)
        self.conv4 = ConvNormAct(2 * dim + 2 * stage, dim, 1)

    def forward(self, x):
        halves = list(self.conv1(x).chunk(2, 1))
        first = self.conv2(self.csp_rep1(halves[-1]))
        second = self.conv3(self.csp_rep2(first))
        return self.conv4(torch.cat([*halves, first, second], 1))


FUSION_LAYERS = ("rep_elan",)  # fusion blocks that replace the whole CSP layer, not its units


def fusion_layer(name: str, dim: int, expansion: float, num_units: int) -> nn.Module:
    """The top-down / bottom-up fusion from the 2·dim concatenation to dim: RT-DETR's CSP layer of `name`
    units, or a whole fusion layer (`rep_elan`)."""
    if name == "rep_elan":
        return RepELAN(dim, expansion, num_units)
    if name not in FUSION_UNITS:
        raise ValueError(f"unknown fusion block {name!r}; valid: {sorted(FUSION_UNITS) + list(FUSION_LAYERS)}")
    return CSPLayer(2 * dim, dim, name, num_units, expansion)


# ------------------------------------------------------------------------------------------- downsampling


@register_downsample("conv")
def _conv_downsample(channels: int) -> nn.Module:
    return ConvNormAct(channels, channels, 3, 2)


@register_downsample("scdown")
def _scdown(channels: int) -> nn.Module:
    return nn.Sequential(ConvNormAct(channels, channels, 1),
                         ConvNormAct(channels, channels, 3, 2, groups=channels, act=None))


@register_downsample("scdown_linear")
def _scdown_linear(channels: int) -> nn.Module:
    return nn.Sequential(ConvNormAct(channels, channels, 1, act=None),
                         ConvNormAct(channels, channels, 3, 2, groups=channels, act=None))


# ------------------------------------------------------------------------------------------- attention


def sincos_position_embedding(h: int, w: int, dim: int, temperature: float = 10000.0,
                              device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, h*w, dim): [sin(y ω), cos(y ω), sin(x ω), cos(x ω)], rows in the order of `flatten(2)`.

    Rows first, as RT-DETR's reference (on its square maps) and transformers lay it out, so that their
    trained encoders load unchanged."""
    if dim % 4:
        raise ValueError(f"sine-cosine position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    y_term = ys.flatten()[:, None] * omega[None]
    x_term = xs.flatten()[:, None] * omega[None]
    emb = torch.cat([y_term.sin(), y_term.cos(), x_term.sin(), x_term.cos()], dim=1)
    return emb[None].to(dtype)


class AIFI(nn.Module):
    """One post-norm transformer encoder layer over the map's positions; position added to queries and keys."""

    def __init__(self, dim: int, num_heads: int = 8, dim_feedforward: int = 1024, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, dim_feedforward), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim_feedforward, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        pos = sincos_position_embedding(h, w, c, device=x.device, dtype=x.dtype)
        q = k = tokens + pos
        tokens = self.norm1(tokens + self.dropout(self.attn(q, k, tokens, need_weights=False)[0]))
        tokens = self.norm2(tokens + self.dropout(self.ffn(tokens)))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class PartialSelfAttention(nn.Module):
    """YOLOv10's PSA: split channels in two, self-attention + FFN on one half, 1x1 fuse of both halves.
    Keeps YOLOv10's sizes (a head per 64 channels, keys half a head wide, FFN 2x, depthwise 3x3 position
    encoding on the values) rather than the transformer sizes AIFI uses."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.heads = max(1, half // 64)
        self.head_dim = half // self.heads
        self.key_dim = self.head_dim // 2
        self.split = ConvNormAct(dim, 2 * half, 1)
        self.qkv = ConvNormAct(half, half + 2 * self.key_dim * self.heads, 1, act=None)
        self.pos = ConvNormAct(half, half, 3, groups=half, act=None)
        self.proj = ConvNormAct(half, half, 1, act=None)
        self.ffn = nn.Sequential(ConvNormAct(half, 2 * half, 1), ConvNormAct(2 * half, half, 1, act=None))
        self.fuse = ConvNormAct(2 * half, dim, 1)

    def attention(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.heads, 2 * self.key_dim + self.head_dim, h * w).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        weights = (q.transpose(-2, -1) @ k * (1.0 / math.sqrt(self.key_dim))).softmax(-1)
        out = (v @ weights.transpose(-2, -1)).reshape(b, c, h, w) + self.pos(v.reshape(b, c, h, w))
        return self.proj(out)

    def forward(self, x):
        kept, attended = self.split(x).chunk(2, dim=1)
        attended = attended + self.attention(attended)
        attended = attended + self.ffn(attended)
        return self.fuse(torch.cat([kept, attended], dim=1))


@register_encoder_attention("aifi")
def _aifi(dim: int, num_heads: int, dim_feedforward: int, dropout: float) -> nn.Module:
    return AIFI(dim, num_heads, dim_feedforward, dropout)


@register_encoder_attention("psa")
def _psa(dim: int, num_heads: int, dim_feedforward: int, dropout: float) -> nn.Module:
    return PartialSelfAttention(dim)
