"""Where the D-FINE head's tensors live in the official D-FINE code (`DFINETransformer`, the decoder of
Peterande/D-FINE): module names differ, the functions are the same.

Whole detectors (`layout_keys`) map to two layouts: `reference`, the official D-FINE / DEIM model (its
`.pth` files), and `transformers`, Hugging Face's `DFineForObjectDetection`. Their encoder is RT-DETR's with
D-FINE's fusion layer (`model.fusion_block=rep_elan`) and downsampling (`model.downsample=scdown_linear`);
the rows shared with RT-DETR (input projections, attention, lateral convs, the backbone) come from
`distill.detection.layouts`.

The reference also stores constants: `up` and `reg_scale` (frozen parameters, twice each) and each
cross-attention's `num_points_scale`. Here they follow from the configuration, so they are checked, not
loaded: a checkpoint with other values needs another configuration.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from distill.detection import layouts
from distill.detection.distribution import DEFAULT_UP

# (ours, reference): prefixes of the decoder's keys, tried in order; the rest of the key is kept
PREFIXES: list[tuple[str, str]] = [
    (r"input_proj\.(\d+)\.0\.", r"input_proj.\1.conv."),
    (r"input_proj\.(\d+)\.1\.", r"input_proj.\1.norm."),
    (r"enc_output\.0\.", "enc_output.proj."),
    (r"enc_output\.1\.", "enc_output.norm."),
    (r"(denoising_class_embed|enc_score_head|enc_bbox_head|query_pos_head|pre_bbox_head)\.", r"\1."),
    (r"score_heads\.", "dec_score_head."),
    (r"bbox_heads\.", "dec_bbox_head."),
    (r"lqe_layers\.(\d+)\.mlp\.", r"decoder.lqe_layers.\1.reg_conf."),
    (r"layers\.(\d+)\.ffn\.0\.", r"decoder.layers.\1.linear1."),
    (r"layers\.(\d+)\.ffn\.3\.", r"decoder.layers.\1.linear2."),
    (r"layers\.(\d+)\.(self_attn|norm1|norm3|cross_attn|gateway)\.", r"decoder.layers.\1.\2."),
]
_COMPILED = [(re.compile(ours), ref) for ours, ref in PREFIXES]
CONSTANTS = re.compile(r"(decoder\.)?(up|reg_scale)$|decoder\.layers\.\d+\.cross_attn\.num_points_scale$|"
                       r"(anchors|valid_mask)$")


def reference_key(key: str) -> str:
    """The reference's name of our decoder tensor `key` (both relative to the decoder module)."""
    for pattern, ref in _COMPILED:
        match = pattern.match(key)
        if match:
            return match.expand(ref) + key[match.end():]
    raise KeyError(f"{key} has no counterpart in D-FINE's decoder")


def from_reference(decoder: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our decoder's state dict from the reference decoder's; raises on missing or unused tensors and on
    constants that disagree with `decoder`'s configuration."""
    ours = decoder.state_dict()
    loaded = {key: state[reference_key(key)] for key in ours if reference_key(key) in state}
    missing = sorted(set(ours) - set(loaded))
    unused = sorted(set(state) - {reference_key(k) for k in ours} - {k for k in state if CONSTANTS.match(k)})
    if missing or unused:
        raise KeyError(f"D-FINE reference weights do not fit: missing {missing[:8]}, unused {unused[:8]}")
    for name in ("up", "reg_scale"):
        if name in state:
            want = {"up": DEFAULT_UP, "reg_scale": decoder.reg_scale}[name]
            if abs(float(state[name].reshape(-1)[0]) - want) > 1e-6:
                raise ValueError(f"the reference's {name}={float(state[name].reshape(-1)[0])} differs from this "
                                 f"decoder's {want}")
    for i, layer in enumerate(decoder.layers):
        scale = state.get(f"decoder.layers.{i}.cross_attn.num_points_scale")
        if scale is not None and not torch.allclose(scale.float(), layer.cross_attn.point_scale.flatten().cpu()):
            raise ValueError(f"layer {i}: the reference's offset scales (1 / points per level) "
                             f"{[round(v, 4) for v in scale.tolist()]} differ from this decoder's "
                             f"{[round(v, 4) for v in layer.cross_attn.point_scale.flatten().tolist()]}")
    return loaded


# ------------------------------------------------------------------------------------------- whole detectors


def _rep_elan(ours: str, ref: str) -> list[tuple[str, str, str]]:
    """A fusion layer: ours (and transformers') csp_rep1 / conv2 / csp_rep2 / conv3 are the reference's
    cv2.0 / cv2.1 / cv3.0 / cv3.1; a RepVGG unit's conv3 (3x3) / conv1 (1x1) are its conv1 / conv2."""
    block, ref_block, hf_block = rf"encoder\.{ours}\.(\d+)\.", rf"encoder.{ref}.\1.", rf"model.encoder.{ref}.\1."
    rows = [(block + "conv1\\.", ref_block + "cv1.", hf_block + "conv1."),
            (block + "conv4\\.", ref_block + "cv4.", hf_block + "conv4.")]
    for stage, conv, ref_stage in (("csp_rep1", "conv2", "cv2"), ("csp_rep2", "conv3", "cv3")):
        units = block + stage + r"\.units\.(\d+)\."
        rows += [
            (units + r"conv3\.", rf"{ref_block}{ref_stage}.0.bottlenecks.\2.conv1.",
             rf"{hf_block}{stage}.bottlenecks.\2.conv1."),
            (units + r"conv1\.", rf"{ref_block}{ref_stage}.0.bottlenecks.\2.conv2.",
             rf"{hf_block}{stage}.bottlenecks.\2.conv2."),
            (block + stage + r"\.", f"{ref_block}{ref_stage}.0.", f"{hf_block}{stage}."),
            (block + conv + r"\.", f"{ref_block}{ref_stage}.1.", f"{hf_block}{conv}."),
        ]
    return rows


_AIFI = "model.encoder.aifi.0.layers.0.mlp.layers."
# (ours, reference, transformers), tried before the rows shared with RT-DETR
ENCODER_PREFIXES: list[tuple[str, str, str]] = [
    # the reference wraps each SCDown in a one-module Sequential
    (r"encoder\.downsample\.(\d+)\.0\.", r"encoder.downsample_convs.\1.0.cv1.",
     r"model.encoder.downsample_convs.\1.conv1."),
    (r"encoder\.downsample\.(\d+)\.1\.", r"encoder.downsample_convs.\1.0.cv2.",
     r"model.encoder.downsample_convs.\1.conv2."),
    (r"encoder\.attention\.ffn\.0\.", "encoder.encoder.0.layers.0.linear1.", _AIFI + "0."),
    (r"encoder\.attention\.ffn\.3\.", "encoder.encoder.0.layers.0.linear2.", _AIFI + "1."),
]
ELAN_PREFIXES = _rep_elan("top_down", "fpn_blocks") + _rep_elan("bottom_up", "pan_blocks")
_DEC = "model.decoder."
# ours (relative to the decoder) → transformers; the reference's decoder keys are "decoder." + reference_key
DECODER_PREFIXES: list[tuple[str, str]] = [
    (r"input_proj\.", "model.decoder_input_proj."),
    (r"(enc_output|denoising_class_embed|enc_score_head|enc_bbox_head)\.", r"model.\1."),
    (r"(query_pos_head|pre_bbox_head)\.", rf"{_DEC}\1."),
    (r"score_heads\.", f"{_DEC}class_embed."),
    (r"bbox_heads\.", f"{_DEC}bbox_embed."),
    (r"lqe_layers\.(\d+)\.mlp\.", rf"{_DEC}lqe_layers.\1.reg_conf."),
    (r"layers\.(\d+)\.ffn\.0\.", rf"{_DEC}layers.\1.mlp.layers.0."),
    (r"layers\.(\d+)\.ffn\.3\.", rf"{_DEC}layers.\1.mlp.layers.1."),
    (r"layers\.(\d+)\.norm1\.", rf"{_DEC}layers.\1.self_attn_layer_norm."),
    (r"layers\.(\d+)\.norm3\.", rf"{_DEC}layers.\1.final_layer_norm."),
    (r"layers\.(\d+)\.cross_attn\.", rf"{_DEC}layers.\1.encoder_attn."),
    (r"layers\.(\d+)\.(self_attn|gateway)\.", rf"{_DEC}layers.\1.\2."),
]
_ENCODER = [(re.compile(o), ref, hf) for o, ref, hf in ENCODER_PREFIXES]
_ELAN = [(re.compile(o), ref, hf) for o, ref, hf in ELAN_PREFIXES]
_DECODER = [(re.compile(o), hf) for o, hf in DECODER_PREFIXES]


def layout_keys(key: str, layout: str, fusion_block: str = "rep_elan") -> Optional[list[str]]:
    """The key(s) holding our D-FINE detector's tensor `key` in `layout` (`reference` or `transformers`);
    None where it has no counterpart. `fusion_block` is the detector's: D-FINE's fusion layer maps to the
    other layouts' names, any other block keeps RT-DETR's names (which D-FINE files do not hold)."""
    if layout not in layouts.LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; valid: {', '.join(layouts.LAYOUTS)}")
    hf = layout == "transformers"
    if key.startswith("decoder."):
        rest = key[len("decoder."):]
        if not hf:
            try:
                return ["decoder." + reference_key(rest)]
            except KeyError:
                return None
        for pattern, template in _DECODER:
            match = pattern.match(rest)
            if match:
                return layouts.split_attention(match.expand(template), rest[match.end():], layout)
        return None
    rows = _ENCODER + (_ELAN if fusion_block == "rep_elan" else [])
    for pattern, ref, hf_template in rows:
        match = pattern.match(key)
        if match:
            return [match.expand(hf_template if hf else ref) + key[match.end():]]
    return layouts.layout_keys(key, layout)


def bins_of(state: dict[str, torch.Tensor]) -> Optional[int]:
    """reg_max of D-FINE weights in any layout, or None: the first box head's last linear predicts
    4 · (reg_max + 1) values."""
    last = {}
    for key in state:
        match = _BOX_HEAD.search(key)
        if match:
            last[match.group(1)] = max(last.get(match.group(1), -1), int(match.group(2)))
    if not last:
        return None
    head, index = next(iter(last.items()))
    return state[f"{head}.layers.{index}.weight"].shape[0] // 4 - 1


_BOX_HEAD = re.compile(r"^(.*(?:dec_bbox_head|bbox_embed|bbox_heads)\.0)\.layers\.(\d+)\.weight$")
