"""The stored teacher label of one view (offline mode): the `soft.npy` member of a sample, one numpy record.

    full   the whole distribution: float16 probabilities of every class (2 bytes a class, the paper's)
    topk   the k most probable classes: int16 indices (int32 beyond 32767 classes) + float16 probabilities;
           training spreads the mass left out evenly over the other classes (`distill.losses.dense_from_topk`)

Both also keep the view's mixup: the partner's class and the weight λ of the view's own image (a view
without mixup is its own partner, λ = 1), so that a label term on a stored mixed view uses both labels.
One member rather than several: a tar member costs a 512-byte header plus padding to 512 bytes.
"""
from __future__ import annotations

import io

import numpy as np

TARGETS = ("full", "topk")


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype("<i2") if num_classes <= np.iinfo(np.int16).max + 1 else np.dtype("<i4")


def record_dtype(targets: str, num_classes: int, k: int = 0) -> np.dtype:
    ix = index_dtype(num_classes)
    if targets == "full":
        fields = [("prob", "<f2", (num_classes,))]
    elif targets == "topk":
        fields = [("idx", ix, (k,)), ("prob", "<f2", (k,))]
    else:
        raise ValueError(f"stored targets {targets!r}: expected one of {', '.join(TARGETS)}")
    return np.dtype(fields + [("partner", ix), ("lam", "<f4")])


def encode_record(prob: np.ndarray, partner_label: int, lam: float, num_classes: int,
                  idx: np.ndarray | None = None) -> bytes:
    """`prob` of every class (full), or of the classes `idx` (top-k), as one `.npy` record."""
    targets = "full" if idx is None else "topk"
    rec = np.zeros((), dtype=record_dtype(targets, num_classes, 0 if idx is None else len(idx)))
    rec["prob"] = prob
    if idx is not None:
        rec["idx"] = idx
    rec["partner"], rec["lam"] = partner_label, lam
    buf = io.BytesIO()
    np.save(buf, rec, allow_pickle=False)
    return buf.getvalue()


def record_bytes(targets: str, num_classes: int, k: int = 0) -> int:
    """Bytes of one encoded record (the `.npy` member, before tar headers and padding)."""
    n = num_classes if targets == "full" else k
    return len(encode_record(np.zeros(n, np.float16), 0, 1.0, num_classes, None if targets == "full" else np.arange(n)))


def decode_record(data: bytes, label: int) -> dict:
    """{"soft_idx" int64 (k,), "soft_prob" float32 (k,), "partner_label" int64, "lam" float32}; a full record
    comes back with k = every class. `label` is the view's own class, the partner of a record that has none
    (the top-k records of earlier versions kept no mixup)."""
    rec = np.load(io.BytesIO(data), allow_pickle=False)
    names = rec.dtype.names or ()
    if "prob" not in names:
        raise ValueError(f"a soft-label record has fields {names}, not 'prob'")
    prob = np.asarray(rec["prob"], np.float32).reshape(-1)
    idx = np.arange(prob.size, dtype=np.int64) if "idx" not in names else np.asarray(rec["idx"], np.int64).reshape(-1)
    if rec.ndim:  # earlier versions: an array of (idx, prob) entries, no mixup kept
        return {"soft_idx": idx, "soft_prob": prob, "partner_label": np.int64(label), "lam": np.float32(1.0)}
    return {"soft_idx": idx, "soft_prob": prob, "partner_label": np.int64(rec["partner"]),
            "lam": np.float32(rec["lam"])}
