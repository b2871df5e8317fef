"""The teacher's distribution for one view, stored as its top k: float16 probabilities and int16 class indices
(int32 beyond 32767 classes), as one `.npy` member of a structured array with fields `idx` and `prob`.

One member rather than two: a tar member costs a 512-byte header plus padding to 512 bytes, which is more
than the record itself (10 classes: 40 bytes of data, ~170 with the npy header).
"""
from __future__ import annotations

import io

import numpy as np
import torch

from distill.data.shards import SOFT_LABELS

MEMBER = SOFT_LABELS  # the member name the training stream decodes (`decode_soft_labels`)


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype("<i2") if num_classes <= np.iinfo(np.int16).max + 1 else np.dtype("<i4")


def top_k(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, C) probabilities -> (indices (B, k), float16 probabilities (B, k)), most probable first."""
    values, indices = probs.float().topk(k, dim=-1)
    return indices.cpu().numpy(), values.cpu().numpy().astype(np.float16)


def encode_record(idx: np.ndarray, prob: np.ndarray, num_classes: int) -> bytes:
    rec = np.empty(len(idx), dtype=[("idx", index_dtype(num_classes)), ("prob", "<f2")])
    rec["idx"], rec["prob"] = idx, prob
    buf = io.BytesIO()
    np.save(buf, rec, allow_pickle=False)
    return buf.getvalue()


def decode_record(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities) in their stored dtypes; training reads them through `decode_soft_labels`."""
    rec = np.load(io.BytesIO(data), allow_pickle=False)
    return rec["idx"], rec["prob"]
