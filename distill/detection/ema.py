"""RT-DETR's EMA of the detector weights: decay · (1 - exp(-updates / warmups)), parameters and buffers.

The reference ramps the decay up exponentially over its first `warmups` (2000) updates, so the average
follows the weights closely early on and then settles at `decay` (0.9999) for the rest of training. timm's
warm-up, 1 - (1 + t)^(-2/3), is still at 0.9998 after 72 COCO epochs (a window of ~6,500 steps, not 10,000).
The averaging itself is timm's (`ModelEmaV3`: float tensors lerped, integer buffers copied).
"""
from __future__ import annotations

import math
from typing import Optional

from timm.utils import ModelEmaV3
from torch import nn


class RTDETREma(ModelEmaV3):
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 2000, **kwargs):
        super().__init__(model, decay=decay, **kwargs)
        self.warmups = warmups

    def get_decay(self, step: Optional[int] = None) -> float:
        """The decay of the update after `step` earlier ones (0-based, as the training loop counts)."""
        if step is None or self.warmups <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-(step + 1) / self.warmups))
