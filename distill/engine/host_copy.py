"""Host data onto the device without making the host wait for the device.

`tensor.to(device)` from ordinary (pageable) host memory, and `torch.tensor(values, device=...)`, wait until the
GPU has run everything queued before the copy: in a training step that stalls the host once per call. From
pinned memory with `non_blocking=True` the copy joins the queue and the host goes on (torch keeps the pinned
buffer alive until the copy has run).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`, copied without waiting for the device (a tensor already there is returned as is)."""
    device = torch.device(device)
    if device.type == "cuda" and host.device.type == "cpu":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def device_constant(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 1-D tensor of fixed Python `values` on `device`, copied once per (values, device, dtype) and shared
    by every caller afterwards: read it, never write into it."""
    return _constant(tuple(float(v) for v in values), torch.device(device), dtype)


@lru_cache(maxsize=256)
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=dtype), device)
