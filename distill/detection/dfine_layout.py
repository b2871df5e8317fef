"""Where the D-FINE head's tensors live in the official D-FINE code (`DFINETransformer`, the decoder of
Peterande/D-FINE): module names differ, the functions are the same.

The reference also stores constants: `up` and `reg_scale` (frozen parameters, twice each) and each
cross-attention's `num_points_scale`. Here they follow from the configuration, so they are checked, not
loaded: a checkpoint with other values needs another configuration.
"""
from __future__ import annotations

import re

import torch

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
