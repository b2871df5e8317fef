"""The settings a GPU user turns on, chosen by the machine where a recipe leaves them open (`null`).

Where CUDA is: bf16 autocast (`train.precision=auto`, see `engine.logging`), channels-last student and
teacher, fused AdamW (`engine.optim`, everywhere), cudnn's kernel search for the fixed input shapes. On a
CPU, channels-last convolutions are slower, so they stay off.
"""
from __future__ import annotations

from typing import Optional

import torch


def auto_on_gpu(value: Optional[bool]) -> bool:
    """A recipe's explicit choice, or `null` read as: on where CUDA is."""
    return torch.cuda.is_available() if value is None else bool(value)
