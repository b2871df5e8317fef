"""The pieces `distill.finetune_det.main` builds for `detection_step`, for tests that drive the step itself."""
from __future__ import annotations

import torch

from distill.detection.feature_distill import build_feature_distill


def step_parts(cfg, seed: int = 0, accum: int = 1, steps_per_epoch: float = 2.0):
    """What `finetune_det.main` builds for `detection_step`, on the CPU, without a run folder."""
    from accelerate import Accelerator

    from distill.detection.ema import RTDETREma
    from distill.detection.rtdetr import build_criterion, build_rtdetr
    from distill.engine.guards import UpdateGuard
    from distill.engine.optim import build_optimizer, warmup_cosine
    from distill.finetune_det import DetStepParts, model_config, param_groups

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    torch.manual_seed(seed)
    model = build_rtdetr(model_config(cfg.model))
    ema = RTDETREma(model, 0.9, 0)
    distill = build_feature_distill(cfg, model, accelerator, steps_per_epoch=steps_per_epoch, strong_until=100)
    groups = param_groups(model, cfg.optim) + (distill.param_groups(cfg.optim) if distill else [])
    optimizer = build_optimizer(groups, cfg.optim.lr, cfg.optim.weight_decay)
    scheduler = warmup_cosine(optimizer, 0, 100, 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    guard = UpdateGuard(accelerator, optimizer, 10)
    model.train()
    return DetStepParts(accelerator, model, build_criterion(model.cfg), optimizer, scheduler, ema, guard,
                        model.mean, model.std, distill)
