"""Comparing two detectors' outputs where float32 rounding may order near-equal candidates differently.

A detector ranks twice: the decoder keeps the top K of the encoder's proposals (the query order), and
post-processing keeps the top K (query, class) pairs above a threshold (the detection order). Two
implementations of the same function round differently (other kernels, other CPU families), so two
candidates that score within rounding of each other can come out in either order, or one of them on either
side of a cut. A per-position comparison then fails on a correct conversion; these compare the outputs as
the sets they are, still to a limit relative to their scale.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D) and (M, D) → (N, M): the largest absolute difference of each pair of rows."""
    return np.abs(a[:, None, :] - b[None, :, :]).max(-1, initial=0.0)


def assert_same_queries(got: dict, want: dict, rtol: float = 1e-4) -> None:
    """Decoder outputs (`pred_logits` (B, Q, C), `pred_boxes` (B, Q, 4) in [0, 1]) equal query by query, up to
    exchanges of neighbouring queries (a near-tie in the proposal selection): each query of `got` matches one
    of `want` at most one position away, within `rtol` of the logits' scale (logits) and of the image (boxes)."""
    logits = {k: d["pred_logits"].detach().double().cpu().numpy() for k, d in (("got", got), ("want", want))}
    boxes = {k: d["pred_boxes"].detach().double().cpu().numpy() for k, d in (("got", got), ("want", want))}
    assert logits["got"].shape == logits["want"].shape and boxes["got"].shape == boxes["want"].shape
    scale = np.abs(logits["want"]).max()
    for image in range(logits["want"].shape[0]):
        cost = np.maximum(_pairwise(logits["got"][image], logits["want"][image]) / scale,
                          _pairwise(boxes["got"][image], boxes["want"][image]))
        places = np.arange(len(cost))
        rows, cols = linear_sum_assignment(cost + 1e-3 * rtol * np.abs(places[:, None] - places[None, :]))  # in place
        worst = cost[rows, cols].max()
        assert worst <= rtol, f"image {image}: a query differs by {worst:.3g} of the scale (limit {rtol:g})"
        moved = np.abs(rows - cols).max()
        assert moved <= 1, f"image {image}: query {rows[np.argmax(np.abs(rows - cols))]} moved by {moved} places"


def as_arrays(scores, labels, boxes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's detections as float64 scores (N,), integer labels (N,) and xyxy boxes (N, 4)."""
    def array(x):
        return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)

    return (array(scores).astype(np.float64).reshape(-1), array(labels).astype(np.int64).reshape(-1),
            array(boxes).astype(np.float64).reshape(-1, 4))


def from_coco(annotations: list[dict], image_id: int, category_ids: list[int]) -> tuple:
    """One image's detections from COCO-style predictions (xywh `bbox`, `score`, `category_id`), labels as
    indices into `category_ids`."""
    mine = [a for a in annotations if a["image_id"] == image_id]
    return as_arrays([a["score"] for a in mine], [category_ids.index(a["category_id"]) for a in mine],
                     [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in mine)])


def _cut(scores: np.ndarray, threshold: float, num_top: int | None) -> float:
    """The lowest score a detection can have and be missing from this list: the threshold, or the list's
    lowest score where the top K filled it."""
    if num_top is not None and len(scores) >= num_top:
        return max(threshold, float(scores.min()))
    return threshold


def assert_same_detections(got: tuple, want: tuple, score_atol: float, box_atol: float, threshold: float = 0.0,
                           num_top: int | None = None, name: str = "") -> None:
    """One image's post-processed detections (`as_arrays`) equal as sets: every detection of one has one of
    the other with the same label, its score within `score_atol` and its box within `box_atol` (pixels).
    Only a detection that scores within `score_atol` of the other list's cut (the `threshold`, or the last of
    its `num_top`) may be missing from it: a near-tie at the cut."""
    (gs, gl, gb), (ws, wl, wb) = got, want
    cost = np.maximum(np.abs(gs[:, None] - ws[None, :]) / score_atol, _pairwise(gb, wb) / box_atol)
    cost[gl[:, None] != wl[None, :]] = np.inf
    rows, cols = linear_sum_assignment(np.minimum(cost, 1e9))
    close = cost[rows, cols] <= 1
    for side, scores, matched, other in (("got", gs, rows[close], ws), ("want", ws, cols[close], gs)):
        unmatched = np.setdiff1d(np.arange(len(scores)), matched)
        cut = _cut(other, threshold, num_top)
        beyond = [(int(i), round(float(scores[i]), 6)) for i in unmatched if scores[i] > cut + score_atol]
        assert not beyond, (f"{name}: detections (index, score) of {side} with no equal in the other list, "
                            f"above its cut {cut:.6f}: {beyond}")
