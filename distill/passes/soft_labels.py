"""The teacher's distribution for one view, as labelling stores it: the whole distribution in float16, or
its top k (see `distill.data.soft_labels` for the record and `distill.losses.dense_from_topk` for how training
reads a top-k record back)."""
from __future__ import annotations

import numpy as np
import torch

from distill.data.shards import SOFT_LABELS
from distill.data.soft_labels import TARGETS, decode_record, encode_record, record_bytes  # noqa: F401

MEMBER = SOFT_LABELS  # the member name the training stream decodes (`decode_soft_labels`)


def top_k(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, C) probabilities -> (indices (B, k), float16 probabilities (B, k)), most probable first."""
    values, indices = probs.float().topk(k, dim=-1)
    return indices.cpu().numpy(), values.cpu().numpy().astype(np.float16)


def encode_views(probs: torch.Tensor, partner_labels, lams, targets: str, k: int, num_classes: int) -> list[bytes]:
    """The records of a batch of views: (B, C) teacher probabilities, each view's partner class and weight."""
    partner_labels, lams = np.asarray(partner_labels).tolist(), np.asarray(lams, np.float32).tolist()
    if targets == "full":
        full = probs.float().cpu().numpy().astype(np.float16)
        return [encode_record(p, y, w, num_classes) for p, y, w in zip(full, partner_labels, lams)]
    idx, prob = top_k(probs, k)
    return [encode_record(p, y, w, num_classes, i) for i, p, y, w in zip(idx, prob, partner_labels, lams)]
