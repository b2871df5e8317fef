"""Batch statistics over all processes (SyncBatchNorm), as RT-DETR's reference trains (`sync_bn: True`).

16 images over 8 GPUs leave 2 per batch norm and step: the backbone's, the neck's (~40 in the CCFM and its
RepVGG units) and the input projections'. timm's converter is used because it also turns timm's fused
norm + activation layers (`BatchNormAct2d`, MobileNetV4) into their synchronised form with the activation
kept; torch's own would drop it.

Only the trained model is converted: the EMA copy is taken before, and checkpoints hold the same keys
either way, so export and evaluation see plain batch norms. PyTorch synchronises batch statistics on
accelerators only (CUDA, XPU, HPU); with several CPU processes (gloo) the norms stay per process.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger("distill")

SYNC_DEVICES = ("cuda", "xpu", "hpu")


def to_sync_batchnorm(model: nn.Module, world_size: int, device: torch.device, enabled: bool = True) -> nn.Module:
    """`model` with synchronised batch norms when several processes train on an accelerator; else unchanged."""
    if not enabled or world_size <= 1:
        return model
    if torch.device(device).type not in SYNC_DEVICES:
        logger.info("train.sync_bn: batch norms stay per process on %s (PyTorch syncs them on %s only)",
                    torch.device(device).type, ", ".join(SYNC_DEVICES))
        return model
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)
