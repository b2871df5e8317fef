"""Feature distillation into the hybrid encoder during fine-tuning (RT-DETRv4's idea), for training only.

A frozen teacher (a timm model, in real runs a foundation model such as DINOv2/DINOv3) sees each training batch;
one of its feature maps (`distill.teacher_features`, a ViT's patch tokens laid out on the patch grid) is the
target of one encoder map of the detector (`distill.encoder_level`), carried into the teacher's channels by a
trainable 1x1 projection head. The term is logged as `loss_distill`, at a constant or adaptive weight.

RT-DETRv4 (RT-DETRs/RT-DETRv4, `engine/rtv4`) distils the output of the encoder's intra-scale attention (AIFI
on the stride-32 map, before the cross-scale fusion) towards DINOv3 ViT-B/16's final-norm patch tokens, run
on the image at half the detector's side so that both grids match; the projection is a linear layer; the loss
is one minus the cosine similarity per location, averaged. Here the comparison is the pretraining's
`feature_loss` (the teacher's map standardised per location first, see `distill.feature_losses`) on the
encoder map's grid, and the head is the pretraining's `ProjectionHeads` (1x1 convolution and batch norm).

Nothing of this enters the detector: the teacher and the head sit beside it, the encoder map is read by a
forward hook that keeps nothing outside `capturing()`, so the detector's state dict, its EMA copy, export,
deploy and prediction are those of a run without distillation, at unchanged inference cost. The head is
trained by the run's optimizer and saved in the checkpoint (`state_dict`) with the adaptive weight's state,
so a resumed run continues exactly.

The adaptive weight (RT-DETRv4's `distill_adaptive_params`): after every step, the gradient's L1 mass on the
encoder's attention weights (A) is noted against that on the decoder (D), as the share A / (A + D); at each
epoch's end its mean p is compared with the band `grad_share` +- `grad_share_tolerance` (percent). Outside it,
the weight w is scaled by odds(target) / odds(p), with target the band's far edge (its upper edge when p is
below it, its lower edge when above): with odds(p) = A / D and the distillation's part of A proportional to w,
this ratio puts the share on that edge. The factor is at least 0.1, the new weight stays within w/10 .. 10w,
and it never exceeds the ceiling `max_weight` (by default four times the starting weight). During the last
epochs without strong augmentation, and after an epoch in which the attention got no gradient at all, the
weight is `final_weight`.

Where this differs from the reference, and why. RT-DETRv4 (`engine/solver/det_engine.py`, `det_solver.py`)
measures the share against the whole model's gradient (backbone and projection head included) and bounds
only the step (w/10 .. 10w), not the weight. But the distillation gradient reaches the backbone, the
encoder's input projection and the head as well as the attention, so as w grows that share levels off at the
attention's part of the distillation gradient alone; when that part is below the band (2.7% on the tests'
tiny detector, against a band at 11%) the weight grows tenfold an epoch without end and the term swamps the
detection loss. The decoder takes none of the distillation gradient (it lies after every encoder map), so D
does not depend on w, the share here rises towards 100% as w grows, and its odds grow with w as the update
assumes (on that detector: 8.5% at w = 0, 16% at 5, 62% at 50, 94% at 500). `grad_share` is therefore not the
reference's rho: the same training state gives a larger share here. The ceiling covers what remains, a band
above the share that any weight up to the ceiling gives: the weight stays at the ceiling, and the main process
warns, once an epoch, with the share it saw.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from distill.detection.settings import ATTENTION_LEVEL, CEILING_FACTOR, SCHEDULES, weight_ceiling  # noqa: F401 (their old home)
from distill.errors import ConfigError
from distill.feature_losses import feature_loss, resize_to
from distill.models.feature_taps import FeatureTaps, feature_points, points_at_indices
from distill.models.features import load_feature_weights
from distill.models.projection import ProjectionHeads
from distill.models.teacher import FrozenTeacher, create_teacher, model_spec

logger = logging.getLogger("distill")

LOSS_NAME = "loss_distill"


class EncoderMapTap:
    """A forward hook on one encoder module that keeps its output map while `capturing()` (an object rather
    than a closure, so that a deep copy of the detector copies a hook that writes into the copy's own tap)."""

    def __init__(self, module: nn.Module, output_index: Optional[int]):
        self.output_index = output_index  # None: the module returns the map itself; else a list of maps
        self.active, self.map = False, None
        module.register_forward_hook(self)

    def __call__(self, module, args, output):
        if self.active:
            self.map = output if self.output_index is None else output[self.output_index]

    @contextmanager
    def capturing(self) -> Iterator["EncoderMapTap"]:
        self.active, self.map = True, None
        try:
            yield self
        finally:
            self.active = False


def encoder_tap(detector: nn.Module, level: str) -> tuple[EncoderMapTap, int]:
    """The tap on the encoder map named by `level`: `attention` (the intra-scale attention's output on the
    coarsest level) or a stride of the encoder's outputs. Returns the tap and the map's channel count."""
    strides = [int(s) for s in detector.backbone.strides]
    channels = detector.encoder.hidden_dim
    if level == ATTENTION_LEVEL:
        return EncoderMapTap(detector.encoder.attention, None), channels
    if level.isdigit() and int(level) in strides:
        return EncoderMapTap(detector.encoder, strides.index(int(level))), channels
    raise ConfigError(f"distill.encoder_level={level!r}: the encoder has no such level; give "
                      f"{ATTENTION_LEVEL!r} or one of its output strides {strides}")


def adapted_weight(weight: float, share: float, target: float, tolerance: float, ceiling: float) -> float:
    """RT-DETRv4's update of the distillation weight from the mean encoder gradient share (percent) of an
    epoch, at most `ceiling` (the reference has none); see the module's docstring."""
    low, high = target - tolerance, target + tolerance
    if low <= share <= high or weight <= 1e-6:
        return min(weight, ceiling)
    p, goal = share / 100.0, (high if share < low else low) / 100.0
    if p >= 1.0:  # no odds to scale: the attention takes all the gradient
        return min(weight / 10.0, ceiling)
    ratio = max(goal * (1.0 - p) / (p * (1.0 - goal)), 0.1)
    return min(max(weight * ratio, weight / 10.0), weight * 10.0, ceiling)


class DetFeatureDistill:
    """The training-only pieces of the term: the frozen teacher and its tap, the encoder tap, the projection
    head and the weight (with the adaptive schedule's running state)."""

    def __init__(self, cfg, detector: nn.Module, teacher: FrozenTeacher, accelerator, steps_per_epoch: float,
                 strong_until: int):
        d = cfg.distill
        self.teacher, self.accelerator = teacher, accelerator
        name = f"distill.teacher {d.teacher}"
        points = points_at_indices(feature_points(teacher.model, name), [int(d.teacher_features)], name,
                                   "distill.teacher_features")
        self.teacher_tap = FeatureTaps(teacher.model, points)
        self.encoder_tap, channels = encoder_tap(detector, str(d.encoder_level))
        device = accelerator.device
        self.head = ProjectionHeads([channels], self.teacher_tap.channels).to(device).train()
        self.kind, self.schedule = d.loss, d.schedule
        self.weight, self.max_weight = float(d.weight), weight_ceiling(d)
        self.target_share, self.tolerance, self.final_weight = d.grad_share, d.grad_share_tolerance, d.final_weight
        self.steps_per_epoch, self.strong_until = steps_per_epoch, strong_until
        # the gradient shares of the current epoch, summed on the device (read once an epoch)
        self.share_sum = torch.zeros((), device=device)
        self.share_count = torch.zeros((), device=device)
        # the student's normalisation, to give the teacher the [0, 1] pixels it normalises its own way
        self.mean = torch.tensor(detector.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(detector.std, device=device).view(1, 3, 1, 1)
        # the share's parts: the attention, and the decoder that the distillation gradient never reaches
        self.attention_params = [p for p in detector.encoder.attention.parameters() if p.requires_grad]
        self.decoder_params = [p for p in detector.decoder.parameters() if p.requires_grad]

    @contextmanager
    def capturing(self) -> Iterator[EncoderMapTap]:
        """Around the detector's forward: the encoder map is kept for `loss`."""
        with self.encoder_tap.capturing() as tap:
            yield tap

    def teacher_map(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's map of the batch; `images` normalised with the detector's statistics."""
        pixels = (images.float() * self.std + self.mean).clamp_(0, 1)
        with self.teacher_tap.capturing() as maps:
            self.teacher(pixels)
        return maps[0].clone()  # a copy made outside inference mode can enter the loss

    def loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"loss_distill": weighted term}, after a forward of the detector inside `capturing()`. Run it under
        the run's autocast: the teacher and the head take mixed precision; the comparison is in float32."""
        encoder_map = self.encoder_tap.map
        if encoder_map is None:
            raise RuntimeError("no encoder map captured: run the detector's forward inside capturing()")
        self.encoder_tap.map = None  # the graph is the loss's now
        target = self.teacher_map(images)
        projected = self.head([encoder_map])[0]
        # RT-DETRv4 resizes the teacher's map to the student's grid; feature_loss compares on the target's
        target = resize_to(target.float(), tuple(projected.shape[-2:]))
        return {LOSS_NAME: self.weight * feature_loss([projected], [target], [0], self.kind)}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def param_groups(self, optim_cfg) -> list[dict]:
        """The head's optimizer groups, at the detector's learning rate (no weight decay on its norm)."""
        decayed = [p for p in self.head.parameters() if p.ndim > 1]
        rest = [p for p in self.head.parameters() if p.ndim <= 1]
        return [{"params": decayed, "lr": optim_cfg.lr, "weight_decay": optim_cfg.weight_decay,
                 "name": "distill_head"},
                {"params": rest, "lr": optim_cfg.lr, "weight_decay": 0.0, "name": "distill_head_no_decay"}]

    def after_backward(self) -> None:
        """Once the step's gradients are complete: the head's are averaged over the processes (it sits outside
        the detector's DDP wrapper), and under the adaptive schedule the attention's gradient share against the
        decoder's is noted, on the device."""
        if self.accelerator.num_processes > 1:
            for p in self.head.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(self.accelerator.num_processes)
        if self.schedule != "adaptive":
            return
        attention = l1_mass(self.attention_params)
        total = attention + l1_mass(self.decoder_params)
        share = 100.0 * attention / total.clamp_min(1e-30)
        counted = torch.isfinite(share) & (total > 0)  # a non-finite step (skipped by the guard) counts not
        self.share_sum += torch.where(counted, share, torch.zeros_like(share))
        self.share_count += counted.float()

    def end_step(self, steps_done: int) -> None:
        """After the optimizer step: at an epoch's end, the adaptive weight for the next epoch."""
        if self.schedule != "adaptive":
            return
        epoch_before = math.floor((steps_done - 1) / self.steps_per_epoch)
        if math.floor(steps_done / self.steps_per_epoch) == epoch_before:
            return
        count = float(self.share_count)
        share = float(self.share_sum) / count if count else 0.0
        held = False
        if share < 1e-6:
            new, reason = self.final_weight, "no encoder gradient"
        elif steps_done > self.strong_until:
            new, reason = self.final_weight, "last epochs without strong augmentation"
        else:
            new = adapted_weight(self.weight, share, self.target_share, self.tolerance, self.max_weight)
            reason = f"target {self.target_share:g} +- {self.tolerance:g}%"
            held = new >= self.max_weight and share < self.target_share - self.tolerance
        if self.accelerator.is_main_process:
            logger.info("epoch %d: encoder gradient share %.2f%%, %s weight %.4g -> %.4g (%s)",
                        epoch_before, share, LOSS_NAME, self.weight, new, reason)
            if held:
                logger.warning("epoch %d: %s weight held at its ceiling distill.max_weight=%g with the encoder "
                               "attention's gradient share at %.2f%%, below distill.grad_share=%g +- %g%%",
                               epoch_before, LOSS_NAME, self.max_weight, share, self.target_share, self.tolerance)
        self.weight = new
        self.share_sum.zero_()
        self.share_count.zero_()

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "weight": self.weight, "max_weight": self.max_weight,
                "share_sum": self.share_sum.clone(), "share_count": self.share_count.clone()}

    def load_state_dict(self, state: dict) -> None:
        """The saved state; under a lower ceiling than the one it was saved with, the weight is brought to it."""
        self.head.load_state_dict(state["head"])
        self.weight = float(state["weight"])
        if self.weight > self.max_weight:
            if self.accelerator.is_main_process:
                logger.warning("%s weight %.4g from the checkpoint (saved under distill.max_weight=%s) is lowered "
                               "to this run's distill.max_weight=%g", LOSS_NAME, self.weight,
                               state.get("max_weight"), self.max_weight)
            self.weight = self.max_weight
        self.share_sum.copy_(state["share_sum"])
        self.share_count.copy_(state["share_count"])


def l1_mass(params: list[nn.Parameter]) -> torch.Tensor:
    """The summed absolute gradient of `params` (0 without gradients), on the device."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else "cpu")
    return torch.stack([g.detach().float().abs().sum() for g in grads]).sum()


def build_feature_distill(cfg, detector: nn.Module, accelerator, steps_per_epoch: float, strong_until: int
                          ) -> Optional[DetFeatureDistill]:
    """The run's feature distillation, or None without `distill.teacher`. Call it after the EMA copy is made
    (the copy needs no hook) and before the optimizer (which takes the head's parameters)."""
    d = cfg.distill
    if not d.teacher:
        return None
    side = d.teacher_img_size or model_spec(d.teacher).img_size  # a ViT is built for the side it runs at
    local = d.teacher_checkpoint
    if local and not Path(local).exists():
        raise ConfigError(f"distill.teacher_checkpoint={local}: no such file or folder")
    teacher = create_teacher(d.teacher, d.teacher_pretrained and not local, None, num_classes=0 if local else None,
                             img_size=side)
    if local:  # by name, without the head: a checkpoint of any class count serves
        load_feature_weights(teacher.model, local, f"distill.teacher {d.teacher}")
    teacher.for_device(accelerator.device, accelerator.mixed_precision, channels_last=False, compile=False)
    distill = DetFeatureDistill(cfg, detector, teacher, accelerator, steps_per_epoch, strong_until)
    if accelerator.is_main_process:
        point = distill.teacher_tap.points[0]
        logger.info("feature distillation: teacher %s at %d px, its %s (%d channels, stride %d) -> encoder map %s; "
                    "%s loss, weight %g (%s, at most %g)", d.teacher, side, point.module, point.channels,
                    point.stride, d.encoder_level, d.loss, d.weight, d.schedule, distill.max_weight)
    return distill
