"""RT-DETRv2's training augmentations (its `dataloader.yml`) on torchvision's box-aware transforms:

    RandomPhotometricDistort(p=0.5) → RandomZoomOut(fill=0) → RandomIoUCrop (p=0.8) → SanitizeBoundingBoxes(1)
    → RandomHorizontalFlip → Resize(side, side) → SanitizeBoundingBoxes(1)

torchvision's transforms are the reference's own, so the distributions are the reference's by construction.
Two of them get a faster implementation of the same definition, as their torchvision versions took about
35 of the 47 ms the pipeline spent on a 640 x 480 image (one core):
- `PhotometricDistort`: hue is rotated in OpenCV's float HSV (the same HSV model as torchvision's, in
  degrees) instead of torchvision's tensor HSV round trip; the other operations, their order, their
  probabilities and the channel permutation are torchvision's;
- `IoUCrop`: SSD's crop search (`RandomIoUCrop.make_params`: options, trials, scale, aspect, centre and
  IoU checks, the first passing trial taken), with an option's trials drawn and checked at once in NumPy
  instead of one tensor call per trial.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import get_bounding_boxes, query_size


def adjust_hue_uint8(image: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """torchvision's `adjust_hue` for a (3, H, W) uint8 image: HSV hue rotated by `hue_factor` turns."""
    rgb = image.permute(1, 2, 0).numpy().astype(np.float32) * (1.0 / 255.0)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # float input: H in degrees [0, 360), S and V in [0, 1]
    hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * hue_factor, 360.0)
    out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    out = np.clip(out * (255.0 + 1.0 - 1e-3), 0, 255).astype(np.uint8)  # torchvision's float → uint8 rounding
    return torch.from_numpy(out).permute(2, 0, 1)


class PhotometricDistort(T.RandomPhotometricDistort):
    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fast_hue = isinstance(inpt, torch.Tensor) and inpt.dtype == torch.uint8 and inpt.ndim == 3
        hue = params["hue_factor"]
        if hue is not None and fast_hue:
            before_hue = {**params, "hue_factor": None, "channel_permutation": None}
            if not params["contrast_before"]:
                before_hue["contrast_factor"] = None
            inpt = super().transform(inpt, before_hue)
            inpt = tv_tensors.wrap(adjust_hue_uint8(inpt.as_subclass(torch.Tensor), hue), like=inpt)
            after_hue = {"brightness_factor": None, "saturation_factor": None, "hue_factor": None,
                         "contrast_factor": params["contrast_factor"] if not params["contrast_before"] else None,
                         "contrast_before": False, "channel_permutation": params["channel_permutation"]}
            return super().transform(inpt, after_hue)
        return super().transform(inpt, params)


class IoUCrop(T.RandomIoUCrop):
    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        orig_h, orig_w = query_size(flat_inputs)
        boxes = get_bounding_boxes(flat_inputs)
        xyxy = F.convert_bounding_box_format(boxes.as_subclass(torch.Tensor), boxes.format,
                                             tv_tensors.BoundingBoxFormat.XYXY).numpy().astype(np.float64)
        cx, cy = 0.5 * (xyxy[:, 0] + xyxy[:, 2]), 0.5 * (xyxy[:, 1] + xyxy[:, 3])
        areas = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
        while True:
            min_iou = self.options[int(torch.randint(low=0, high=len(self.options), size=(1,)))]
            if min_iou >= 1.0:  # the "leave as is" option
                return dict()
            # all trials of this option at once; the first that passes every check is the one taken
            scale = (self.min_scale + (self.max_scale - self.min_scale) * torch.rand(self.trials, 2)).numpy()
            offset = torch.rand(self.trials, 2).numpy()
            new_w = (orig_w * scale[:, 0].astype(np.float64)).astype(np.int64)
            new_h = (orig_h * scale[:, 1].astype(np.float64)).astype(np.int64)
            with np.errstate(divide="ignore", invalid="ignore"):
                aspect = new_w / new_h
            left = ((orig_w - new_w) * offset[:, 0].astype(np.float64)).astype(np.int64)
            top = ((orig_h - new_h) * offset[:, 1].astype(np.float64)).astype(np.int64)
            right, bottom = left + new_w, top + new_h
            ok = (self.min_aspect_ratio <= aspect) & (aspect <= self.max_aspect_ratio) & (new_w > 0) & (new_h > 0)
            inside = ((left[:, None] < cx) & (cx < right[:, None]) & (top[:, None] < cy) & (cy < bottom[:, None]))
            iw = (np.minimum(xyxy[:, 2], right[:, None]) - np.maximum(xyxy[:, 0], left[:, None])).clip(min=0)
            ih = (np.minimum(xyxy[:, 3], bottom[:, None]) - np.maximum(xyxy[:, 1], top[:, None])).clip(min=0)
            inter = iw * ih
            with np.errstate(divide="ignore", invalid="ignore"):
                ious = np.where(inside, inter / (areas + (new_w * new_h)[:, None] - inter), -1.0)
            ok &= inside.any(1) & (ious.max(1, initial=-1.0) >= min_iou)
            if ok.any():
                t = int(np.argmax(ok))
                return dict(top=int(top[t]), left=int(left[t]), height=int(new_h[t]), width=int(new_w[t]),
                            is_within_crop_area=torch.from_numpy(inside[t]))


def rtdetr_train_transform(size: int, strong: bool) -> T.Compose:
    """Training: the strong augmentations (until the last epochs), flip, square resize, tiny boxes dropped."""
    ops: list = []
    if strong:
        ops += [
            PhotometricDistort(p=0.5),
            T.RandomZoomOut(fill=0, side_range=(1.0, 4.0), p=0.5),
            T.RandomApply([IoUCrop()], p=0.8),
            T.SanitizeBoundingBoxes(min_size=1),
        ]
    ops += [T.RandomHorizontalFlip(p=0.5), T.Resize((size, size), antialias=True), T.SanitizeBoundingBoxes(min_size=1)]
    return T.Compose(ops)


def eval_transform(size: int) -> T.Compose:
    """Evaluation and prediction: the square resize alone (antialiased bilinear, as transformers' processor)."""
    return T.Compose([T.Resize((size, size), antialias=True)])
