"""One-to-one matching of predictions to targets (Hungarian, via scipy's linear_sum_assignment).

Cost = 2 · focal-style class cost (alpha 0.25, gamma 2) + 5 · L1 on cxcywh boxes + 2 · (−GIoU).

The assignment runs on the host, so the cost matrices must reach it: the one place where the training step
waits for the device, once per batch for every set of predictions together. Under CUDA's sync debug mode
(`torch.cuda.set_sync_debug_mode("error")`, a check that nothing else in the step waits) that transfer is let
through.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from distill.detection.box_ops import cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                    target_boxes: torch.Tensor) -> torch.Tensor:
        """(M, K) cost of predictions (M, C) logits / (M, 4) boxes against K targets."""
        prob = logits.float().sigmoid()[:, labels]
        positive = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        negative = (1 - self.alpha) * prob ** self.gamma * -(1 - prob + 1e-8).log()
        l1 = torch.cdist(boxes.float(), target_boxes.float(), p=1)
        giou = generalized_box_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(target_boxes.float()))
        return self.cost_class * (positive - negative) + self.cost_bbox * l1 - self.cost_giou * giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image (prediction indices, target indices), both LongTensors on CPU, sorted by prediction."""
        return self.match_all([outputs], targets)[0]

    @torch.no_grad()
    def match_all(self, outputs: list[dict], targets: list[dict]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """`forward` for several sets of predictions at once (the last decoder layer, the auxiliary layers, the
        encoder's proposals): their cost matrices reach the host in one transfer, so the loss waits for the
        device once per batch, not once per set."""
        labels = torch.cat([t["labels"] for t in targets]).to(outputs[0]["pred_logits"].device)
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(outputs[0]["pred_boxes"].device)
        if len(labels) == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return [[(empty, empty) for _ in targets] for _ in outputs]
        costs = torch.stack([
            self.cost_matrix(o["pred_logits"].flatten(0, 1), o["pred_boxes"].flatten(0, 1), labels,
                             target_boxes).view(*o["pred_logits"].shape[:2], -1)
            for o in outputs
        ])  # (sets, batch, queries, all targets)
        with expected_wait(costs.device):
            costs = costs.cpu()
        sizes = [len(t["labels"]) for t in targets]
        matched = []
        for cost in costs:
            indices = []
            for i, block in enumerate(cost.split(sizes, dim=-1)):
                rows, cols = linear_sum_assignment(block[i].numpy())
                indices.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
            matched.append(indices)
        return matched


@contextmanager
def expected_wait(device: torch.device):
    """Lets one intended host-device synchronisation through CUDA's sync debug mode, whatever it is set to."""
    if device.type != "cuda":
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)
