"""RT-DETR (v2 style) around any backbone from `distill.models.features`: backbone → hybrid encoder →
decoder. The decoder head is RT-DETRv2's (`head="rtdetrv2"`) or D-FINE's (`head="dfine"`: distributions
over edge offsets, see `distill.detection.dfine_decoder`; train it with `build_criterion(cfg)`).
Build it from an `RTDETRConfig`; presets name the neck/decoder sizes:

- `v2_s`: RT-DETRv2-S (the R18 size): width 256, expansion 0.5, three CSP units, 3 decoder layers, FFN 1024;
- `light`: the D-FINE-N / DEIMv2-tiny style neck: width 128, two levels (strides 16, 32), expansion 0.34,
  depth 0.5, FFN 512, 6 sampling points per level. With light backbones the encoder dominates the compute;
- `dfine_n`: `light` with D-FINE's head (3 layers, 6 points on each of the two levels), as D-FINE-N;
- `dfine_s`: D-FINE-S: width 256, expansion 0.5, depth 0.34 (one CSP unit), FFN 1024, 3 layers, D-FINE's
  head with [3, 6, 3] points on the strides 8, 16, 32.

    model = build_rtdetr(rtdetr_config("mobilenetv4_conv_small", num_classes=80, preset="v2_s"))
    outputs = model(images, targets)        # training: also aux / encoder / denoising outputs
    losses = build_criterion(model.cfg)(outputs, targets)
    detections = PostProcessor(300)(model.eval()(images), orig_sizes)

Images are normalised with the backbone's mean/std (`model.mean`, `model.std`); sides must be multiples of
the largest stride. Targets are `{"labels": (N,), "boxes": (N, 4) cxcywh in 0..1}` per image.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch
from torch import nn

from distill.detection.blocks import RepVGGUnit
from distill.detection.criterion import MAL_GAMMA, RTDETRCriterion
from distill.detection.decoder import RTDETRDecoder
from distill.detection.dfine_criterion import DFINECriterion
from distill.detection.dfine_decoder import DFineDecoder
from distill.detection.hybrid_encoder import HybridEncoder
from distill.detection.matcher import HungarianMatcher
from distill.detection.postprocess import PostProcessor
from distill.detection.settings import HEADS, RTDETRConfig, check_head
from distill.models.factory import input_spec
from distill.models.features import create_feature_extractor

__all__ = ["RTDETRConfig", "PRESETS", "HEADS", "rtdetr_config", "build_rtdetr", "build_criterion", "RTDETR",
           "RTDETRCriterion", "DFINECriterion", "HungarianMatcher", "PostProcessor"]

PRESETS: dict[str, dict] = {
    "v2_s": {},
    "light": dict(hidden_dim=128, expansion=0.34, depth_mult=0.5, dim_feedforward=512, out_strides=(16, 32),
                  num_points=6),
    "dfine_n": dict(hidden_dim=128, expansion=0.34, depth_mult=0.5, dim_feedforward=512, out_strides=(16, 32),
                    num_points=6, head="dfine", num_decoder_layers=3),
    "dfine_s": dict(hidden_dim=256, expansion=0.5, depth_mult=0.34, dim_feedforward=1024, head="dfine",
                    num_decoder_layers=3, num_points_per_level=(3, 6, 3)),
}


def rtdetr_config(backbone: str, num_classes: int, preset: str = "v2_s", **overrides) -> RTDETRConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown RT-DETR preset {preset!r}; valid: {sorted(PRESETS)}")
    valid = {f.name for f in fields(RTDETRConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown RT-DETR config keys {unknown}; valid: {sorted(valid)}")
    return RTDETRConfig(backbone=backbone, num_classes=num_classes, **{**PRESETS[preset], **overrides})


class RTDETR(nn.Module):
    def __init__(self, cfg: RTDETRConfig, backbone: nn.Module, encoder: HybridEncoder,
                 decoder: RTDETRDecoder | DFineDecoder):
        super().__init__()
        self.cfg = cfg
        self.backbone, self.encoder, self.decoder = backbone, encoder, decoder
        self.max_stride = max(backbone.strides)
        spec = input_spec(backbone)
        self.mean, self.std = spec.mean, spec.std
        self.init_report = None  # set when built with `init_from`: what was loaded from where

    def forward(self, images: torch.Tensor, targets: Optional[list[dict]] = None) -> dict:
        h, w = images.shape[-2:]
        if h % self.max_stride or w % self.max_stride:
            raise ValueError(f"image size {h}x{w} is not a multiple of the largest stride {self.max_stride}")
        return self.decoder(self.encoder(self.backbone(images)), targets)

    def reparameterize(self) -> "RTDETR":
        """Fold the RepVGG units' two branches into one conv each (inference only; outputs unchanged)."""
        for module in self.modules():
            if isinstance(module, RepVGGUnit) and module.fused is None:
                module.reparameterize()
        return self


def _pair(size: Optional[int | Sequence[int]]) -> Optional[tuple[int, int]]:
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def build_rtdetr(cfg: RTDETRConfig) -> RTDETR:
    check_head(cfg)
    backbone = create_feature_extractor(cfg.backbone, cfg.pretrained_backbone, cfg.backbone_checkpoint,
                                        tuple(cfg.out_strides))
    encoder = HybridEncoder(backbone.channels, cfg.hidden_dim, cfg.expansion, cfg.depth_mult, cfg.fusion_block,
                            cfg.downsample, cfg.encoder_attention, cfg.num_heads, cfg.dim_feedforward, cfg.dropout)
    in_channels = [cfg.hidden_dim] * len(backbone.channels)
    if cfg.head == "dfine":
        points = cfg.num_points_per_level or [cfg.num_points] * len(in_channels)
        decoder = DFineDecoder(
            cfg.num_classes, in_channels, backbone.strides, cfg.hidden_dim, cfg.num_queries, cfg.num_decoder_layers,
            cfg.num_heads, points, cfg.dim_feedforward, cfg.dropout, cfg.num_denoising, cfg.label_noise_ratio,
            cfg.box_noise_scale, _pair(cfg.eval_spatial_size), cfg.reg_max, cfg.reg_scale)
    else:
        decoder = RTDETRDecoder(
            cfg.num_classes, in_channels, backbone.strides, cfg.hidden_dim, cfg.num_queries, cfg.num_decoder_layers,
            cfg.num_heads, cfg.num_points, cfg.dim_feedforward, cfg.dropout, cfg.num_denoising,
            cfg.label_noise_ratio, cfg.box_noise_scale, _pair(cfg.eval_spatial_size))
    model = RTDETR(replace(cfg, eval_spatial_size=_pair(cfg.eval_spatial_size)), backbone, encoder, decoder)
    if cfg.init_from:
        from distill.detection.pretrained import load_detector_weights

        # a whole detector of this project brings its backbone, unless model.backbone_checkpoint names one
        model.init_report = load_detector_weights(model, cfg.init_from, backbone=not cfg.backbone_checkpoint)
    return model


def build_criterion(cfg: RTDETRConfig) -> RTDETRCriterion:
    """The training loss of the configured head, with its reference weights."""
    check_head(cfg)
    gamma = MAL_GAMMA if cfg.class_loss == "mal" else 2.0
    if cfg.head == "dfine":
        return DFINECriterion(cfg.num_classes, gamma=gamma, reg_max=cfg.reg_max, reg_scale=cfg.reg_scale,
                              classification=cfg.class_loss)
    return RTDETRCriterion(cfg.num_classes, gamma=gamma, classification=cfg.class_loss)
