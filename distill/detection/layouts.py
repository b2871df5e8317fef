"""Where this project's RT-DETR tensors live in the two other layouts users hold weights in:

- `reference`: the official RT-DETRv2 code (`rtdetrv2_pytorch`, the `.pth` files it publishes);
- `transformers`: Hugging Face's `RTDetrV2ForObjectDetection` (and `RTDetrForObjectDetection`, same names).

The models compute the same functions (same blocks, same order of operations); only module names differ,
plus transformers' attention, which splits PyTorch's fused q/k/v projection into three linears. Each row
maps a prefix of our key to its prefix in each layout; the rest of the key is kept. The reference's
backbone is its own (ResNet / HGNetv2), so it has no counterpart.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import torch

LAYOUTS = ("reference", "transformers")
HF_BACKBONE = "model.backbone.model._backbone."  # transformers' TimmBackbone holds the timm model here

_ENC_LAYER = ("encoder.encoder.0.layers.0.", "model.encoder.aifi.0.layers.0.")


def _csp(ours: str, ref: str) -> list[tuple]:
    """A CSP fusion block: our RepVGG unit's conv3 (3x3) / conv1 (1x1) are the reference's conv1 / conv2."""
    return [
        (rf"encoder\.{ours}\.(\d+)\.units\.(\d+)\.conv3\.", rf"encoder.{ref}.\1.bottlenecks.\2.conv1.",
         rf"model.encoder.{ref}.\1.bottlenecks.\2.conv1."),
        (rf"encoder\.{ours}\.(\d+)\.units\.(\d+)\.conv1\.", rf"encoder.{ref}.\1.bottlenecks.\2.conv2.",
         rf"model.encoder.{ref}.\1.bottlenecks.\2.conv2."),
        (rf"encoder\.{ours}\.", f"encoder.{ref}.", f"model.encoder.{ref}."),
    ]


# (ours, reference, transformers): prefixes, tried in order
PREFIXES: list[tuple[str, Optional[str], str]] = [
    (r"backbone\.", None, HF_BACKBONE),
    (r"encoder\.input_proj\.(\d+)\.0\.", r"encoder.input_proj.\1.conv.", r"model.encoder_input_proj.\1.0."),
    (r"encoder\.input_proj\.(\d+)\.1\.", r"encoder.input_proj.\1.norm.", r"model.encoder_input_proj.\1.1."),
    (r"encoder\.attention\.attn\.", _ENC_LAYER[0] + "self_attn.", _ENC_LAYER[1] + "self_attn."),
    (r"encoder\.attention\.ffn\.0\.", _ENC_LAYER[0] + "linear1.", _ENC_LAYER[1] + "mlp.fc1."),
    (r"encoder\.attention\.ffn\.3\.", _ENC_LAYER[0] + "linear2.", _ENC_LAYER[1] + "mlp.fc2."),
    (r"encoder\.attention\.norm1\.", _ENC_LAYER[0] + "norm1.", _ENC_LAYER[1] + "self_attn_layer_norm."),
    (r"encoder\.attention\.norm2\.", _ENC_LAYER[0] + "norm2.", _ENC_LAYER[1] + "final_layer_norm."),
    (r"encoder\.lateral\.", "encoder.lateral_convs.", "model.encoder.lateral_convs."),
    (r"encoder\.downsample\.", "encoder.downsample_convs.", "model.encoder.downsample_convs."),
    *_csp("top_down", "fpn_blocks"),
    *_csp("bottom_up", "pan_blocks"),
    (r"decoder\.input_proj\.(\d+)\.0\.", r"decoder.input_proj.\1.conv.", r"model.decoder_input_proj.\1.0."),
    (r"decoder\.input_proj\.(\d+)\.1\.", r"decoder.input_proj.\1.norm.", r"model.decoder_input_proj.\1.1."),
    (r"decoder\.enc_output\.0\.", "decoder.enc_output.proj.", "model.enc_output.0."),
    (r"decoder\.enc_output\.1\.", "decoder.enc_output.norm.", "model.enc_output.1."),
    (r"decoder\.(denoising_class_embed|enc_score_head|enc_bbox_head)\.", r"decoder.\1.", r"model.\1."),
    (r"decoder\.query_pos_head\.", "decoder.query_pos_head.", "model.decoder.query_pos_head."),
    (r"decoder\.score_heads\.", "decoder.dec_score_head.", "model.decoder.class_embed."),
    (r"decoder\.bbox_heads\.", "decoder.dec_bbox_head.", "model.decoder.bbox_embed."),
    (r"decoder\.layers\.(\d+)\.ffn\.0\.", r"decoder.decoder.layers.\1.linear1.", r"model.decoder.layers.\1.mlp.fc1."),
    (r"decoder\.layers\.(\d+)\.ffn\.3\.", r"decoder.decoder.layers.\1.linear2.", r"model.decoder.layers.\1.mlp.fc2."),
    (r"decoder\.layers\.(\d+)\.norm1\.", r"decoder.decoder.layers.\1.norm1.",
     r"model.decoder.layers.\1.self_attn_layer_norm."),
    (r"decoder\.layers\.(\d+)\.norm2\.", r"decoder.decoder.layers.\1.norm2.",
     r"model.decoder.layers.\1.encoder_attn_layer_norm."),
    (r"decoder\.layers\.(\d+)\.norm3\.", r"decoder.decoder.layers.\1.norm3.",
     r"model.decoder.layers.\1.final_layer_norm."),
    (r"decoder\.layers\.(\d+)\.cross_attn\.", r"decoder.decoder.layers.\1.cross_attn.",
     r"model.decoder.layers.\1.encoder_attn."),
    (r"decoder\.layers\.(\d+)\.self_attn\.", r"decoder.decoder.layers.\1.self_attn.",
     r"model.decoder.layers.\1.self_attn."),
]
_COMPILED = [(re.compile(ours), ref, hf) for ours, ref, hf in PREFIXES]

# PyTorch's fused attention projection → transformers' three linears (and its output projection's name)
_QKV = ("q_proj", "k_proj", "v_proj")


def layout_keys(key: str, layout: str) -> Optional[list[str]]:
    """The key(s) holding our tensor `key` in `layout`: one, or three for a fused q/k/v projection in the
    transformers layout (stacked in that order); None where the layout has no counterpart."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    for pattern, ref, hf in _COMPILED:
        match = pattern.match(key)
        if match is None:
            continue
        template = ref if layout == "reference" else hf
        if template is None:
            return None
        return split_attention(match.expand(template), key[match.end():], layout)
    return None


def split_attention(prefix: str, rest: str, layout: str) -> list[str]:
    """The key(s) of `prefix` + `rest` in `layout`: transformers splits PyTorch's fused q/k/v projection
    into three linears (stacked in that order) and names the self-attention's output projection `o_proj`."""
    if layout == "transformers" and rest.startswith("in_proj_"):
        return [f"{prefix}{name}.{rest[len('in_proj_'):]}" for name in _QKV]
    if layout == "transformers" and rest.startswith("out_proj.") and prefix.endswith("self_attn."):
        rest = "o_proj." + rest[len("out_proj."):]
    return [prefix + rest]


def gather(source: dict[str, torch.Tensor], keys: list[str]) -> Optional[torch.Tensor]:
    """Our tensor from its key(s) in a state dict of another layout (None when any is missing)."""
    if not all(k in source for k in keys):
        return None
    return source[keys[0]] if len(keys) == 1 else torch.cat([source[k] for k in keys], 0)


def to_layout(state: dict[str, torch.Tensor], layout: str, skip: Iterable[str] = (),
              keys_of: Optional[Callable[[str], Optional[list[str]]]] = None) -> dict[str, torch.Tensor]:
    """Our (training-form) state dict in `layout`; keys starting with one of `skip` are left out. `keys_of`
    maps a key to its key(s) there (default: RT-DETR's `layout_keys`; D-FINE passes its own)."""
    skip = tuple(skip)
    keys_of = keys_of or (lambda key: layout_keys(key, layout))
    out = {}
    for key, value in state.items():
        if skip and key.startswith(skip):
            continue
        targets = keys_of(key)
        if targets is None:
            raise KeyError(f"{key} has no place in the {layout} layout")
        parts = value.chunk(len(targets), 0) if len(targets) > 1 else (value,)
        out.update({t: p.contiguous() for t, p in zip(targets, parts)})
    return out
