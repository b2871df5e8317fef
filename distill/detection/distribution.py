"""D-FINE's box parameterisation: each edge of a box is a distance from its reference box, given as a
probability distribution over `reg_max + 1` bins (the "corners"); the distance is the expectation of the
non-uniform weighting function W(n) under that distribution.

W(n) runs from -2·up·reg_scale to +2·up·reg_scale with W(reg_max / 2) = 0. The inner bins grow geometrically
away from the centre, so bins near zero are fine (small corrections) and the outer ones coarse; the two end
bins jump to ±2·up·reg_scale to reach far edges. Distances are in units of the reference box's side divided
by reg_scale, measured from the reference box's own edges (a distance of 0 keeps the edge where it is).

    W = weighting_function(32, 0.5, 4.0)
    boxes = distance_to_box(ref_boxes, integral(corner_logits, W), 4.0)
    left_bin, weight_right, weight_left = box_to_distance(ref_boxes, target_xyxy, 32, 4.0, 0.5)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.detection.box_ops import xyxy_to_cxcywh
from distill.engine.host_copy import device_constant

DEFAULT_UP = 0.5  # D-FINE's fixed `up`: the outer bins reach ±2 · 0.5 · reg_scale


def weighting_function(reg_max: int, up: float, reg_scale: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """W(n) for n = 0..reg_max, shape (reg_max + 1,): a new host tensor, or with `device` the one shared copy
    there (made once, without waiting for the device: the loss asks for it every step)."""
    if reg_max < 4 or reg_max % 2:
        raise ValueError(f"reg_max must be an even number of at least 4, got {reg_max}")
    inner_bound = abs(up) * abs(reg_scale)
    # the inner bins follow step^i - 1, reaching inner_bound at i = reg_max / 2 - 1
    step = (inner_bound + 1) ** (2 / (reg_max - 2))
    half = reg_max // 2
    right = [step ** i - 1 for i in range(1, half)]
    values = [-2 * inner_bound] + [-v for v in reversed(right)] + [0.0] + right + [2 * inner_bound]
    return torch.tensor(values, dtype=dtype) if device is None else device_constant(values, device, dtype)


def integral(corner_logits: torch.Tensor, project: torch.Tensor) -> torch.Tensor:
    """(..., 4 · (reg_max + 1)) logits → (..., 4) expected distances Σ softmax(logits)_n · W(n)."""
    bins = project.shape[0]
    prob = F.softmax(corner_logits.reshape(*corner_logits.shape[:-1], 4, bins), dim=-1)
    return prob @ project.to(prob.dtype)


def distance_to_box(ref_boxes: torch.Tensor, distances: torch.Tensor, reg_scale: float) -> torch.Tensor:
    """Reference boxes (..., 4) cxcywh and distances (..., 4) as (left, top, right, bottom) → cxcywh boxes."""
    reg_scale = abs(reg_scale)
    centre, size = ref_boxes[..., :2], ref_boxes[..., 2:]
    half = 0.5 * reg_scale
    top_left = centre - (half + distances[..., :2]) * (size / reg_scale)
    bottom_right = centre + (half + distances[..., 2:]) * (size / reg_scale)
    return xyxy_to_cxcywh(torch.cat([top_left, bottom_right], -1))


@torch.no_grad()
def box_to_distance(ref_boxes: torch.Tensor, target_xyxy: torch.Tensor, reg_max: int, reg_scale: float,
                    up: float = DEFAULT_UP, eps: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training target of the corners: for N reference boxes (cxcywh) and their targets (xyxy), flattened
    over the 4 edges (N · 4,): a fractional bin index whose floor is the left bin, and the weights of the
    left and right bins that interpolate the target distance linearly between W(left) and W(left + 1).
    Distances beyond W's range put all weight on the end bin."""
    reg_scale = abs(reg_scale)
    unit = ref_boxes[:, 2:] / reg_scale + 1e-16  # the size of a distance of 1, per axis
    distances = torch.cat([(ref_boxes[:, :2] - target_xyxy[:, :2]) / unit,
                           (target_xyxy[:, 2:] - ref_boxes[:, :2]) / unit], -1) - 0.5 * reg_scale
    distances = distances.reshape(-1)
    project = weighting_function(reg_max, up, reg_scale, distances.dtype, distances.device)

    left = (project[None, :] <= distances[:, None]).sum(1) - 1  # the last bin at or below the distance
    inside = (left >= 0) & (left < reg_max)
    left_value = project[left.clamp(0, reg_max - 1)]
    right_value = project[(left + 1).clamp(0, reg_max)]
    to_left, to_right = (distances - left_value).abs(), (right_value - distances).abs()
    weight_right = torch.where(inside, to_left / (to_left + to_right), (left >= reg_max).to(distances.dtype))
    weight_left = 1 - weight_right
    # below W(0): all on bin 0; at or above W(reg_max): all on the last bin (index just under reg_max)
    index = torch.where(left >= reg_max, torch.full_like(distances, reg_max - 0.1), left.to(distances.dtype))
    index = torch.where(left < 0, torch.zeros_like(distances), index)
    return index.clamp(0, reg_max - eps), weight_right, weight_left
