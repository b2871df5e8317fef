"""Matching, losses, denoising queries and post-processing of the RT-DETR model."""
import itertools

import pytest
import torch

from distill.detection.box_ops import cxcywh_to_xyxy, elementwise_box_iou, inverse_sigmoid
from distill.detection.criterion import RTDETRCriterion
from distill.detection.denoising import build_denoising_queries
from distill.detection.matcher import HungarianMatcher
from distill.detection.postprocess import PostProcessor
from distill.detection.rtdetr import build_rtdetr, rtdetr_config


def _target(labels, boxes):
    return {"labels": torch.tensor(labels, dtype=torch.long),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)}


def test_box_helpers():
    a = cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.4, 0.2], [0.2, 0.2, 0.2, 0.2]]))
    b = cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2]]))
    assert torch.allclose(elementwise_box_iou(a, b), torch.tensor([0.5, 0.0]), atol=1e-6)
    x = torch.tensor([0.0, 0.3, 1.0])
    y = inverse_sigmoid(x)
    assert torch.isfinite(y).all() and torch.allclose(y.sigmoid()[1], x[1])


def test_matcher_pairs_each_target_with_its_prediction():
    logits = torch.tensor([[[-5.0, 5.0], [-5.0, -5.0], [5.0, -5.0]]])
    boxes = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9], [0.25, 0.25, 0.2, 0.2]]])
    targets = [_target([0, 1], [[0.25, 0.25, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])]
    (rows, cols), = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert rows.tolist() == [0, 2] and cols.tolist() == [1, 0]


def test_matcher_assignment_is_optimal():
    torch.manual_seed(0)
    matcher = HungarianMatcher()
    logits = torch.randn(2, 5, 4)
    boxes = torch.rand(2, 5, 4) * 0.5 + 0.25
    targets = [_target([1, 3, 0], (torch.rand(3, 4) * 0.5 + 0.25).tolist()), _target([], [])]
    indices = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    cost = matcher.cost_matrix(logits[0], boxes[0], targets[0]["labels"], targets[0]["boxes"])
    rows, cols = indices[0]
    best = min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    assert torch.isclose(cost[rows, cols].sum(), best)
    assert len(indices[1][0]) == 0  # an image without boxes matches nothing


def test_criterion_rewards_exact_predictions():
    crit = RTDETRCriterion(num_classes=3)
    targets = [_target([2, 0], [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])]
    boxes = torch.tensor([[[0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]]])
    right = torch.tensor([[[6.0, -6, -6], [-6, -6, -6], [-6, -6, 6.0]]])
    wrong = torch.tensor([[[-6.0, 6, -6], [-6, -6, -6], [6.0, -6, -6]]])
    good = crit({"pred_logits": right, "pred_boxes": boxes}, targets)
    bad = crit({"pred_logits": wrong, "pred_boxes": boxes}, targets)
    assert good["loss_bbox"] == 0 and good["loss_giou"].abs() < 1e-4
    assert good["loss_vfl"] < 0.1 * bad["loss_vfl"]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = rtdetr_config("test_resnet", num_classes=3, hidden_dim=32, num_heads=4, dim_feedforward=64,
                        num_queries=10, num_denoising=6, depth_mult=0.34)
    return build_rtdetr(cfg)


@pytest.mark.parametrize("boxes_per_image", [(2, 0), (0, 0)])
def test_criterion_is_finite_without_boxes(tiny_model, boxes_per_image):
    tiny_model.train()
    tiny_model.zero_grad()
    targets = [_target([1] * n, [[0.5, 0.5, 0.3, 0.3]] * n) for n in boxes_per_image]
    outputs = tiny_model(torch.randn(2, 3, 64, 64), targets)
    assert "dn_outputs" in outputs  # even for a batch without boxes: every process runs the same branch
    losses = RTDETRCriterion(3)(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert {"loss_vfl_aux_1", "loss_giou_enc_0", "loss_bbox_dn_2"} <= set(losses)
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in tiny_model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    if sum(boxes_per_image) == 0:
        assert all(v == 0 for k, v in losses.items() if "bbox" in k or "giou" in k)
        assert losses["loss_vfl"] > 0  # every query is pushed towards background
    else:
        assert losses["loss_giou"] > 0 and losses["loss_bbox_dn_0"] > 0


def test_denoising_groups_and_mask():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(5, 8, padding_idx=4)
    targets = [_target([1, 2], [[0.3, 0.3, 0.1, 0.2], [0.6, 0.5, 0.2, 0.1]]), _target([], []),
               _target([0, 3, 1], [[0.5, 0.5, 0.2, 0.2]] * 3)]
    num_queries = 7
    dn = build_denoising_queries(targets, embed, num_classes=4, num_queries=num_queries, num_denoising=12,
                                 label_noise_ratio=0.0, box_noise_scale=1.0)
    slots, groups = 3, 4
    assert dn.groups == groups and dn.num_denoising == 2 * slots * groups == dn.content.shape[1]
    mask = dn.attn_mask
    assert mask.shape == (dn.num_denoising + num_queries,) * 2
    assert not mask.diagonal().any()  # every query sees itself: no fully blocked softmax row
    assert mask[dn.num_denoising:, :dn.num_denoising].all()  # matching queries never see the answers
    assert not mask[:, dn.num_denoising:].any()  # every query may look at the matching queries
    group = torch.arange(dn.num_denoising) // (2 * slots)
    assert torch.equal(mask[:dn.num_denoising, :dn.num_denoising], group[:, None] != group[None])
    assert [len(i) for i in dn.positive_idx] == [2 * groups, 0, 3 * groups]

    # positives: corners moved by at most half the box size; negatives: by half to one box size (a negative
    # whose corners crossed comes back with them swapped, so either pairing of its corners may hold)
    boxes = dn.boxes_logit.sigmoid()
    for img, t in enumerate(targets):
        for g, j in itertools.product(range(groups), range(len(t["labels"]))):
            truth = cxcywh_to_xyxy(t["boxes"][j]).view(2, 2).T  # rows: x corners, y corners
            half = t["boxes"][j, 2:, None] / 2
            pos = cxcywh_to_xyxy(boxes[img, g * 2 * slots + j]).view(2, 2).T
            neg = cxcywh_to_xyxy(boxes[img, g * 2 * slots + slots + j]).view(2, 2).T
            assert ((pos - truth).abs() <= half + 1e-4).all()
            far = [((pairing - truth).abs() >= half - 1e-4).all(1) for pairing in (neg, neg.flip(1))]
            assert (far[0] | far[1]).all()
            assert (dn.content[img, g * 2 * slots + j] == embed.weight[t["labels"][j]]).all()
    assert (dn.content[1] == 0).all()  # padding class for an image without boxes

    empty = build_denoising_queries([_target([], []), _target([], [])], embed, 4, num_queries, 12)
    assert empty.num_denoising == 2 and empty.groups == 1 and all(len(i) == 0 for i in empty.positive_idx)
    assert empty.attn_mask[2:, :2].all() and not empty.attn_mask.diagonal().any()


def test_label_noise_flips_about_the_requested_share():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(81, 4, padding_idx=80)
    labels = torch.zeros(50, dtype=torch.long)
    targets = [{"labels": labels, "boxes": torch.full((50, 4), 0.5)}] * 8
    dn = build_denoising_queries(targets, embed, 80, 10, num_denoising=100, label_noise_ratio=0.5, box_noise_scale=0)
    kept = (dn.content == embed.weight[0]).all(-1).float().mean()
    assert 0.68 < kept < 0.82  # a quarter flipped to a random class (one in 80 lands on the same class)


def test_postprocess_topk_and_scale():
    logits = torch.full((2, 4, 3), -9.0)
    logits[0, 2, 1] = 4.0
    logits[0, 0, 0] = 2.0
    logits[1, 3, 2] = 3.0
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(2, 4, 1)
    boxes[0, 2] = torch.tensor([0.25, 0.5, 0.5, 0.2])
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    results = PostProcessor(num_top=5)(outputs, torch.tensor([[200, 100], [640, 480]]))
    assert len(results) == 2 and all(r["boxes"].shape == (5, 4) and r["scores"].shape == (5,) for r in results)
    first = results[0]
    assert first["labels"][:2].tolist() == [1, 0] and (first["scores"].diff() <= 0).all()
    assert torch.allclose(first["scores"][0], torch.sigmoid(torch.tensor(4.0)))
    assert torch.allclose(first["boxes"][0], torch.tensor([0.0, 40.0, 100.0, 60.0]))
    assert torch.allclose(results[1]["boxes"][0], torch.tensor([256.0, 144.0, 384.0, 336.0]))
    assert PostProcessor(num_top=300)(outputs, torch.tensor([[1, 1]] * 2))[0]["scores"].shape == (12,)  # all pairs
