"""The detector's settings and the names a detection recipe is checked against, without torch: the recipe
schema (`distill.detection.recipe`), and with it `--help` and a mistake in a key, load without the model code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

HEADS = ("rtdetrv2", "dfine")
CLASSIFICATION_LOSSES = ("vfl", "mal")
ATTENTION_LEVEL = "attention"  # encoder_level naming the intra-scale attention's output (RT-DETRv4's choice)
SCHEDULES = ("constant", "adaptive")
# The default ceiling, in starting weights: RT-DETRv4's recipes never set a weight beyond four times the one
# they start at (S: 5, then 20 in its last epochs; M: 5, then 15; L and X keep 15 and 20)
CEILING_FACTOR = 4.0


@dataclass
class RTDETRConfig:
    backbone: str
    backbone_checkpoint: Optional[str] = None
    pretrained_backbone: bool = False
    num_classes: int = 80
    hidden_dim: int = 256
    expansion: float = 0.5
    num_queries: int = 300
    num_decoder_layers: int = 3
    num_heads: int = 8
    num_points: int = 4
    dim_feedforward: int = 1024  # encoder attention and decoder FFN width
    fusion_block: str = "csp_repvgg"  # D-FINE's own neck: rep_elan with downsample scdown_linear
    downsample: str = "conv"
    encoder_attention: str = "aifi"
    num_denoising: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    eval_spatial_size: Optional[tuple[int, int]] = None  # (h, w): fixed anchors for export
    out_strides: tuple[int, ...] = (8, 16, 32)
    depth_mult: float = 1.0  # CSP units per fusion block = round(3 · depth_mult)
    dropout: float = 0.0
    # encoder + decoder weights: an official RT-DETRv2 / D-FINE .pth or a transformers folder; a run's best.pt
    # brings its backbone too (unless backbone_checkpoint names one)
    init_from: Optional[str] = None
    head: str = "rtdetrv2"  # the decoder head: rtdetrv2 | dfine
    # D-FINE head only: sampling points per level (D-FINE-S [3, 6, 3]); None: num_points on every level
    num_points_per_level: Optional[tuple[int, ...]] = None
    reg_max: int = 32  # D-FINE: bins per edge distribution are reg_max + 1
    reg_scale: float = 4.0  # D-FINE: the curvature / range of the weighting function W(n)
    class_loss: str = "vfl"  # vfl (RT-DETR, D-FINE) | mal (DEIM's matchability-aware loss, gamma 1.5)



def check_head(cfg, prefix: str = "") -> None:
    """The head and loss settings the reference implementations support; a ValueError naming the keys (with
    `prefix`, e.g. "model.") otherwise. `cfg`: an `RTDETRConfig` or anything with its attributes (a recipe's model)."""
    head, points = f"{prefix}head", f"{prefix}num_points_per_level"
    if cfg.head not in HEADS:
        raise ValueError(f"{head}={cfg.head!r} is not one of {', '.join(HEADS)}")
    if cfg.class_loss not in CLASSIFICATION_LOSSES:
        raise ValueError(f"{prefix}class_loss={cfg.class_loss!r} is not one of {', '.join(CLASSIFICATION_LOSSES)}")
    if cfg.head == "rtdetrv2" and cfg.num_points_per_level is not None:
        raise ValueError(f"{points} is a D-FINE setting: set {head}=dfine, or {prefix}num_points for rtdetrv2")
    if cfg.head != "dfine":
        return
    if cfg.num_points_per_level is not None and len(cfg.num_points_per_level) != len(cfg.out_strides):
        raise ValueError(f"{points}={list(cfg.num_points_per_level)} needs one entry per level of "
                         f"{prefix}out_strides={list(cfg.out_strides)}")
    if cfg.reg_max < 4 or cfg.reg_max % 2:
        raise ValueError(f"{head}=dfine needs an even {prefix}reg_max of at least 4 (D-FINE: 32), got {cfg.reg_max}")
    if cfg.reg_scale <= 0:
        raise ValueError(f"{head}=dfine needs {prefix}reg_scale > 0 (D-FINE: 4), got {cfg.reg_scale}")



def weight_ceiling(d) -> float:
    """The largest weight of the term: `distill.max_weight`, or by default `CEILING_FACTOR` starting weights."""
    return float(d.max_weight) if d.max_weight is not None else CEILING_FACTOR * float(d.weight)
