"""The order-free comparisons of detector outputs (tests/detections.py) accept what rounding can do (near-equal
candidates exchanged) and nothing else: a query or a detection off by 1e-3 of the scale fails them."""
import numpy as np
import pytest
import torch

from detections import as_arrays, assert_same_detections, assert_same_queries


def decoder_outputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pred_logits": 3 * torch.randn(2, 20, 3, generator=g), "pred_boxes": torch.rand(2, 20, 4, generator=g)}


def changed(outputs, image, query, key, delta):
    out = {k: v.clone() for k, v in outputs.items()}
    out[key][image, query] += delta
    return out


def swapped(outputs, image, a, b):
    out = {k: v.clone() for k, v in outputs.items()}
    for v in out.values():
        v[image, [a, b]] = v[image, [b, a]]
    return out


def test_queries_equal_up_to_neighbours_exchanged():
    want = decoder_outputs()
    scale = want["pred_logits"].abs().max()
    assert_same_queries(swapped(changed(want, 1, 3, "pred_boxes", 1e-6), 1, 14, 15), want)  # rounding, a near-tie
    for wrong in (changed(want, 1, 7, "pred_boxes", 1e-3),  # one box moved by 1e-3 of the image
                  changed(want, 0, 0, "pred_logits", 1e-3 * scale),  # one logit by 1e-3 of the scale
                  swapped(want, 0, 2, 9)):  # an order rounding cannot explain
        with pytest.raises(AssertionError):
            assert_same_queries(wrong, want)


def detections(seed=0, count=20):
    rng = np.random.default_rng(seed)
    scores = np.sort(rng.uniform(0.3, 0.9, count))[::-1].copy()
    xy = rng.uniform(0, 150, (count, 2))
    return scores, rng.integers(0, 3, count), np.concatenate([xy, xy + rng.uniform(5, 50, (count, 2))], 1)


def test_detections_equal_as_sets_up_to_ties_at_the_cut():
    scores, labels, boxes = detections()
    want = as_arrays(scores, labels, boxes)
    limits = dict(score_atol=1e-5, box_atol=1e-3, threshold=0.2, num_top=20)
    order = np.r_[1, 0, 2:20]  # two near-equal scores in the other order
    near = scores.copy()
    near[1] = scores[0] - 1e-6
    assert_same_detections(as_arrays(near[order], labels[order], boxes[order]), as_arrays(near, labels, boxes),
                           **limits)
    # the last of the top K exchanged for another candidate that scores within rounding of it
    other = as_arrays(np.r_[scores[:-1], scores[-1] + 1e-6], np.r_[labels[:-1], 1], np.r_[boxes[:-1], [[1, 2, 3, 4]]])
    assert_same_detections(other, want, **limits)

    moved = boxes.copy()
    moved[4, 2] += 1e-3 * 200  # one box moved by 1e-3 of the image
    relabelled = labels.copy()
    relabelled[5] = (labels[5] + 1) % 3
    lower = scores.copy()
    lower[6] -= 1e-3
    for wrong in (as_arrays(scores, labels, moved), as_arrays(scores, relabelled, boxes),
                  as_arrays(lower, labels, boxes),
                  as_arrays(scores[1:], labels[1:], boxes[1:])):  # the best detection missing
        with pytest.raises(AssertionError):
            assert_same_detections(wrong, want, **limits)
    # an exchange at the cut that rounding cannot explain: the new candidate scores 1e-3 above the last
    beyond = as_arrays(np.r_[scores[:-1], scores[-1] + 1e-3], np.r_[labels[:-1], 1], np.r_[boxes[:-1], [[1, 2, 3, 4]]])
    with pytest.raises(AssertionError):
        assert_same_detections(beyond, want, **limits)
