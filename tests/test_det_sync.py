"""The detection training step never makes the host wait for the device, whatever the head and the training
options, except for the one transfer that the Hungarian matcher needs: every cost matrix of a micro-batch
reaches the host together. Counted on the CPU by reading the step's device as a GPU (tests/device_syncs.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from det_steps import step_parts
from device_syncs import CountSyncs

from distill.data.synthetic_coco import generate_coco_shapes
from distill.detection.recipe import load_det_config

TINY = """
model: {backbone: test_efficientnet, hidden_dim: 32, dim_feedforward: 64, num_heads: 2, num_queries: 10,
        num_decoder_layers: 3, num_points: 2, num_denoising: 0, num_classes: 3}
data: {root: %(root)s, train_images: train/images, train_ann: train/annotations.json,
       val_images: train/images, val_ann: train/annotations.json, img_size: 64, multiscale: [],
       batch_size: 3, val_batch_size: 3, num_workers: 0, mosaic_size: 48}
optim: {lr: 0.002, backbone_lr: 0.002, warmup_steps: 0, clip_grad: 1.0, grad_accum: 2}
train: {steps: 2, ckpt_every: 2, keep_ckpts: 5, log_every: 1, ema_decay: 0.9, ema_warmups: 0, no_aug_epochs: 0,
        precision: 'no', trackers: [jsonl]}
eval: {visualize: 0, num_top: 20}
"""
DENOISING = ["model.num_denoising=6"]
DFINE = ["model.head=dfine", *DENOISING]
OPTIONS = {
    "rtdetrv2": [],
    "rtdetrv2-denoising": DENOISING,
    "dfine": DFINE,
    "dfine-no-denoising": ["model.head=dfine"],
    "dfine-mal": [*DFINE, "model.class_loss=mal"],
    "deim-mosaic-mixup": [*DFINE, "model.class_loss=mal", "data.mosaic_prob=1", "data.mixup_prob=1"],
    "encoder-distillation": [*DENOISING, "distill.teacher=test_resnet", "distill.teacher_pretrained=false",
                             "distill.teacher_img_size=64"],
}
STEPS, ACCUM = 2, 2
MATCHER_TRANSFER = ("cpu", "matcher.py", "match_all")  # the cost matrices of one micro-batch, all at once


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("detsync")
    generate_coco_shapes(root / "shapes", num_train=8, num_val=1, img_size=64, num_classes=3, max_objects=3, seed=0)
    (root / "tiny.yaml").write_text(TINY % {"root": root / "shapes"})
    return root


def training_batches(world: Path, cfg) -> list[dict]:
    """The loader's first STEPS x ACCUM batches, Mosaic and MixUp drawn as the recipe says from the start."""
    from distill.data.coco import CocoDetection, DetectionBatchSampler, Phase, build_train_loader
    from distill.finetune_det import mosaic_settings

    shapes = world / "shapes/train"
    data = CocoDetection(shapes / "images", shapes / "annotations.json", True, 64, mosaic=mosaic_settings(cfg.data))
    total = STEPS * ACCUM
    sampler = DetectionBatchSampler(len(data), cfg.data.batch_size, [64], total, 0, total,
                                    mosaic=Phase(cfg.data.mosaic_prob, 0, total),
                                    mixup=Phase(cfg.data.mixup_prob, 0, total))
    batches = iter(build_train_loader(data, sampler, 0, 0))
    return [next(batches) for _ in range(total)]


@pytest.mark.parametrize("option", OPTIONS)
def test_the_step_waits_for_the_device_only_for_the_matchers_one_transfer(world, option):
    from distill.finetune_det import detection_step

    cfg = load_det_config([f"recipe={world / 'tiny.yaml'}", *OPTIONS[option]])
    parts = step_parts(cfg, accum=ACCUM, steps_per_epoch=100.0)
    batches = training_batches(world, cfg)
    assert all(sum(len(t["labels"]) for t in b["targets"]) > 0 for b in batches)  # every micro-batch is matched
    for step in range(STEPS):
        with CountSyncs() as counter:
            losses, _, _ = detection_step(parts, batches[step * ACCUM:(step + 1) * ACCUM], cfg, step)
        assert counter.calls == [MATCHER_TRANSFER] * ACCUM, (option, step, counter.calls)
    assert all(torch.isfinite(v).all() for v in losses.values())
    if cfg.model.head == "dfine":  # the distribution losses ran
        assert {"loss_fgl", "loss_ddf_aux_0"} <= set(losses)
    if cfg.model.num_denoising:
        assert "loss_bbox_dn_0" in losses
    if cfg.distill.teacher:
        assert "loss_distill" in losses


def test_the_count_sees_what_would_wait_for_a_gpu():
    """Device values read on the host, sizes that depend on them and blocking copies count; the same work on
    host tensors (matched indices, say) and non-blocking copies do not."""
    device = torch.device("cpu")  # the step's device, read as a GPU
    with CountSyncs() as counter:
        x = torch.randn(6, device=device)
        mask = x > 0
        host = torch.arange(6)
        host[host > 2].sum().item()  # host data: nothing waits
        torch.unique(host)
        host.to(device, non_blocking=True)
        torch.full((), 3.0, device=device)
        x.sum() * 2
    assert counter.calls == []
    waits = [lambda: x[mask], lambda: bool(mask.any()), lambda: x.sum().item(), lambda: torch.nonzero(x),
             lambda: torch.tensor([1.0, 2.0], device=device), lambda: host.to(device), lambda: x.cpu(),
             lambda: x.to("cpu"), lambda: float(x[0]), lambda: torch.unique(x), lambda: x.tolist()]
    for wait in waits:
        with CountSyncs() as counter:
            wait()
        assert len(counter.calls) == 1, counter.calls
        assert counter.calls[0][1:] == (Path(__file__).name, "<lambda>")
