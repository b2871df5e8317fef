"""This project's RT-DETR ⇄ transformers' `RTDetrV2ForObjectDetection`, whole detectors (backbone included),
and with D-FINE's head ⇄ transformers' `DFineForObjectDetection`.

    hf_model = to_transformers(model, class_names)   # same logits and boxes; save_pretrained() it
    model = from_transformers(hf_model)              # or from_transformers("<folder>")
    hf_model = to_transformers_dfine(dfine_model, class_names)   # from_transformers reads it back too

D-FINE converts when its neck is D-FINE's own (`model.fusion_block=rep_elan`, `model.downsample=scdown_linear`,
`aifi` attention) and the backbone a timm model; weights move through `distill.detection.dfine_layout`.

The architectures match block for block when the neck is RT-DETR's own (`csp_repvgg` units, three per
fusion block; `conv` downsampling; `aifi` attention) and the backbone is a timm model (transformers wraps it
in its `TimmBackbone`, with batch-norm freezing off so timm's fused norm + activation layers stay intact).
Weights move through `distill.detection.layouts`.

One behaviour differs by design: our query selection never picks a position whose anchor is invalid (a
cell centre within 1% of the border), where transformers (as the reference) only zeroes its features and
may pick it, with an infinite box. Feature maps under 50 cells wide (sides under 400 px at stride 8) have
no invalid anchor; beyond, the two agree as long as no such position makes transformers' top-K, which the
export checks on a probe image.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from torch import nn

from distill.detection import dfine_layout
from distill.detection.distribution import DEFAULT_UP
from distill.detection.layouts import gather, layout_keys, to_layout
from distill.detection.rtdetr import RTDETR, RTDETRConfig, build_rtdetr

NEEDED = {"fusion_block": "csp_repvgg", "downsample": "conv", "encoder_attention": "aifi"}
# transformers' D-FINE has D-FINE's own neck
NEEDED_DFINE = {"fusion_block": "rep_elan", "downsample": "scdown_linear", "encoder_attention": "aifi"}


def check_convertible(cfg: RTDETRConfig, backbone: nn.Module, needed: dict = NEEDED,
                      name: str = "RT-DETRv2") -> None:
    problems = [f"model.{k}={getattr(cfg, k)!r} (transformers has {v!r} only)" for k, v in needed.items()
                if getattr(cfg, k) != v]
    units = round(3 * cfg.depth_mult)
    if needed["fusion_block"] == "csp_repvgg" and max(units, 1) != 3:  # RT-DETR's blocks: fixed at 3 units
        problems.append(f"model.depth_mult={cfg.depth_mult} (transformers' fusion blocks hold 3 units)")
    if units < 1:  # transformers builds round(3 · depth_mult) units, we at least one
        problems.append(f"model.depth_mult={cfg.depth_mult} (transformers' fusion blocks would hold no unit)")
    if not hasattr(backbone, "feature_info"):
        problems.append(f"backbone {cfg.backbone} (transformers takes timm backbones only)")
    if problems:
        raise ValueError(f"this detector has no transformers {name} counterpart: " + "; ".join(problems))


def _shared_fields(cfg: RTDETRConfig, backbone: nn.Module, class_names: Sequence[str]) -> dict:
    """The config fields transformers' RT-DETRv2 and D-FINE share, for the same timm backbone, neck and
    decoder sizes."""
    from transformers import TimmBackboneConfig

    levels = len(backbone.channels)
    if len(class_names) != cfg.num_classes:
        raise ValueError(f"{len(class_names)} class names for a detector of {cfg.num_classes} classes")
    timm_backbone = TimmBackboneConfig(backbone=cfg.backbone, out_indices=list(backbone.feature_info.out_indices),
                                       features_only=True, use_pretrained_backbone=False)
    return dict(
        backbone_config=timm_backbone, freeze_backbone_batch_norms=False,
        encoder_in_channels=list(backbone.channels), feat_strides=list(backbone.strides),
        encoder_hidden_dim=cfg.hidden_dim, d_model=cfg.hidden_dim, hidden_expansion=cfg.expansion,
        encoder_layers=1, encode_proj_layers=[levels - 1], encoder_ffn_dim=cfg.dim_feedforward,
        decoder_ffn_dim=cfg.dim_feedforward, encoder_attention_heads=cfg.num_heads,
        decoder_attention_heads=cfg.num_heads, decoder_layers=cfg.num_decoder_layers, num_queries=cfg.num_queries,
        num_feature_levels=levels, decoder_in_channels=[cfg.hidden_dim] * levels, num_denoising=cfg.num_denoising,
        label_noise_ratio=cfg.label_noise_ratio, box_noise_scale=cfg.box_noise_scale,
        dropout=cfg.dropout, activation_dropout=cfg.dropout, attention_dropout=cfg.dropout,
        activation_function="silu", encoder_activation_function="gelu", decoder_activation_function="relu",
        anchor_image_size=None, eval_size=None, learn_initial_query=False, with_box_refine=True,
        decoder_offset_scale=0.5, decoder_method="default",
        num_labels=cfg.num_classes, id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
    )


def hf_config(cfg: RTDETRConfig, backbone: nn.Module, class_names: Sequence[str]):
    """The `RTDetrV2Config` of the same detector (timm backbone at the same feature levels)."""
    from transformers import RTDetrV2Config

    check_convertible(cfg, backbone)
    levels = len(backbone.channels)
    return RTDetrV2Config(**_shared_fields(cfg, backbone, class_names), decoder_n_points=cfg.num_points,
                          decoder_n_levels=levels)


def hf_dfine_config(cfg: RTDETRConfig, backbone: nn.Module, class_names: Sequence[str]):
    """The `DFineConfig` of the same D-FINE detector (timm backbone at the same feature levels)."""
    from transformers import DFineConfig

    check_convertible(cfg, backbone, NEEDED_DFINE, "D-FINE")
    points = list(cfg.num_points_per_level or [cfg.num_points] * len(backbone.channels))
    return DFineConfig(**_shared_fields(cfg, backbone, class_names), decoder_n_points=points,
                       depth_mult=cfg.depth_mult, max_num_bins=cfg.reg_max, reg_scale=cfg.reg_scale, up=DEFAULT_UP,
                       eval_idx=-1, layer_scale=1.0)


def rtdetr_config_from_hf(config: dict) -> RTDETRConfig:
    """Our config of a transformers RT-DETR(v2) `config.json` with a timm backbone."""
    backbone = config.get("backbone_config") or {}
    if backbone.get("model_type") != "timm_backbone":
        raise ValueError(f"the backbone is {backbone.get('model_type')!r}; only timm backbones convert "
                         "(model.init_from takes the encoder and decoder of any)")
    mismatched = [f"{a}={config[a]} vs {b}={config[b]}" for a, b in
                  [("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim"),
                   ("encoder_hidden_dim", "d_model")] if config[a] != config[b]]
    if mismatched or config.get("learn_initial_query") or config.get("encoder_layers", 1) != 1:
        raise ValueError(f"this transformers RT-DETR has no counterpart here: {mismatched or 'learnt queries / '}"
                         f"{config.get('encoder_layers')} encoder layers")
    return RTDETRConfig(
        backbone=backbone["backbone"], num_classes=len(config["id2label"]), hidden_dim=config["d_model"],
        expansion=config["hidden_expansion"], num_queries=config["num_queries"],
        num_decoder_layers=config["decoder_layers"], num_heads=config["decoder_attention_heads"],
        num_points=config["decoder_n_points"], dim_feedforward=config["decoder_ffn_dim"],
        num_denoising=config["num_denoising"], label_noise_ratio=config["label_noise_ratio"],
        box_noise_scale=config["box_noise_scale"], out_strides=tuple(config["feat_strides"]),
        dropout=config.get("dropout", 0.0),
    )


def dfine_config_from_hf(config: dict) -> RTDETRConfig:
    """Our config of a transformers D-FINE `config.json` with a timm backbone (D-FINE's neck and head)."""
    unsupported = {k: config.get(k, v) for k, v in [("eval_idx", -1), ("layer_scale", 1), ("up", DEFAULT_UP),
                                                     ("lqe_hidden_dim", 64), ("lqe_layers", 2), ("top_prob_values", 4)]
                   if config.get(k, v) != v}
    if unsupported:
        raise ValueError(f"this transformers D-FINE has no counterpart here: {unsupported}")
    points = config["decoder_n_points"]
    points = list(points) if isinstance(points, (list, tuple)) else [points] * len(config["feat_strides"])
    return replace(rtdetr_config_from_hf({**config, "decoder_n_points": points[0]}), head="dfine",
                   fusion_block="rep_elan", downsample="scdown_linear", depth_mult=config["depth_mult"],
                   num_points_per_level=tuple(points), reg_max=config["max_num_bins"], reg_scale=config["reg_scale"])


def _fill(hf: nn.Module, state: dict, constants: tuple[str, ...], name: str) -> nn.Module:
    """Load our weights (already in transformers' names) into `hf`; only `constants` (buffers transformers
    builds from its config) may stay unfilled."""
    for key in [k for k in state if k.startswith(("model.decoder.class_embed.", "model.decoder.bbox_embed."))]:
        state[key[len("model.decoder."):]] = state[key]  # the top-level copies transformers ties to these
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(constants)]
    if missing or unexpected:
        raise ValueError(f"transformers' {name} does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf.eval()


def _check_training_form(model: RTDETR) -> None:
    if any(getattr(m, "fused", None) is not None for m in model.modules()):
        raise ValueError("the detector is in its deploy form (RepVGG units fused); convert the training form")


def to_transformers(model: RTDETR, class_names: Sequence[str]) -> nn.Module:
    """transformers' `RTDetrV2ForObjectDetection` holding `model`'s weights (training form), in eval mode."""
    if model.cfg.head != "rtdetrv2":
        raise ValueError(f"a detector with head={model.cfg.head!r} has no RT-DETRv2 counterpart in transformers; "
                         "export it --to hf-dfine (transformers' D-FINE)")
    from transformers import RTDetrV2ForObjectDetection

    _check_training_form(model)
    hf = RTDetrV2ForObjectDetection(hf_config(model.cfg, model.backbone, class_names))
    return _fill(hf, to_layout(model.state_dict(), "transformers"), ("n_points_scale",), "RT-DETRv2")


def to_transformers_dfine(model: RTDETR, class_names: Sequence[str]) -> nn.Module:
    """transformers' `DFineForObjectDetection` holding a D-FINE-head `model`'s weights, in eval mode."""
    if model.cfg.head != "dfine":
        raise ValueError(f"a detector with head={model.cfg.head!r} has no D-FINE counterpart in transformers; "
                         "export it --to hf-rtdetr (transformers' RT-DETRv2)")
    from transformers import DFineForObjectDetection

    _check_training_form(model)
    hf = DFineForObjectDetection(hf_dfine_config(model.cfg, model.backbone, class_names))
    state = to_layout(model.state_dict(), "transformers",
                      keys_of=lambda key: dfine_layout.layout_keys(key, "transformers", model.cfg.fusion_block))
    return _fill(hf, state, ("num_points_scale", "decoder.up", "decoder.reg_scale"), "D-FINE")


def from_transformers(source) -> tuple[RTDETR, list[str]]:
    """Our detector (and its class names) from a transformers RT-DETR, RT-DETRv2 or D-FINE model or folder."""
    if isinstance(source, (str, Path)):
        from distill.detection.pretrained import hf_state_dict

        config = json.loads((Path(source) / "config.json").read_text())
        state = hf_state_dict(Path(source))
    else:
        config, state = source.config.to_dict(), source.state_dict()
    dfine = config.get("model_type") == "d_fine"
    model = build_rtdetr(dfine_config_from_hf(config) if dfine else rtdetr_config_from_hf(config))
    expected = list(getattr(model.backbone.feature_info, "out_indices", []))
    if list(config["backbone_config"].get("out_indices") or []) != expected:
        raise ValueError(f"the timm backbone's out_indices {config['backbone_config'].get('out_indices')} are not "
                         f"the strides-8/16/32 levels {expected} this project uses")
    converted, absent = {}, []
    for key in model.state_dict():
        keys = (dfine_layout.layout_keys(key, "transformers", model.cfg.fusion_block) if dfine
                else layout_keys(key, "transformers"))
        tensor = gather(state, keys) if keys else None
        if tensor is None:
            absent.append(key)
        else:
            converted[key] = tensor
    if absent:
        raise ValueError(f"the transformers weights lack {len(absent)} tensors, e.g. {absent[:5]}")
    model.load_state_dict(converted)
    names = [config["id2label"][k] for k in sorted(config["id2label"], key=int)]
    return model.eval(), names


