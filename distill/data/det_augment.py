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

DEIM's dense one-to-one matching adds two (its `deim.yml`, `mosaic.py` and collate function), off unless a
recipe turns them on:
- Mosaic: four images scaled to a shorter side of 320, one in the top-left corner of each quadrant of a
  canvas twice the largest height and width (the rest black), then RandomAffine(10 degrees, translate 0.1,
  scale 0.5-1.5, fill 0) over the canvas; such a sample goes on with photometric distortion, flip and resize,
  without zoom-out and IoU crop;
- MixUp over a batch: image i blended with image i-1 (the first with the last) at a ratio drawn in
  [0.45, 0.55], its targets the union of both images' targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert
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


@dataclass(frozen=True)
class MosaicSettings:
    """DEIM's Mosaic (configs/base/deim.yml): each image's shorter side on the canvas and the affine's ranges."""

    size: int = 320
    rotation: float = 10.0  # degrees either way
    translate: float = 0.1  # share of the canvas either way, per axis
    scale: tuple[float, float] = (0.5, 1.5)


def mosaic_canvas(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four (H, W, 3) uint8 images with their xywh pixel boxes and labels → one (3, 2h, 2w) uint8 canvas, its
    xyxy pixel boxes and labels. Each image is scaled to `size` on its shorter side (antialiased, as
    torchvision's Resize(size) that DEIM uses) and put in the top-left corner of its quadrant (reading order);
    h and w are the largest scaled height and width."""
    scaled = []
    for image, boxes_xywh, labels in parts:
        height, width = image.shape[:2]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        tensor = F.resize(tensor, [size], antialias=True)
        new_h, new_w = tensor.shape[-2:]
        boxes = box_convert(torch.as_tensor(boxes_xywh, dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy")
        boxes *= torch.tensor([new_w / width, new_h / height] * 2)
        scaled.append((tensor, boxes, torch.as_tensor(labels, dtype=torch.int64).reshape(-1)))
    cell_h = max(t.shape[-2] for t, _, _ in scaled)
    cell_w = max(t.shape[-1] for t, _, _ in scaled)
    canvas = torch.zeros(3, 2 * cell_h, 2 * cell_w, dtype=torch.uint8)
    all_boxes, all_labels = [], []
    for k, (tensor, boxes, labels) in enumerate(scaled):
        top, left = (k // 2) * cell_h, (k % 2) * cell_w
        canvas[:, top:top + tensor.shape[-2], left:left + tensor.shape[-1]] = tensor
        all_boxes.append(boxes + torch.tensor([left, top, left, top], dtype=torch.float32))
        all_labels.append(labels)
    return canvas, torch.cat(all_boxes), torch.cat(all_labels)


def mosaic_train_transform(size: int, settings: MosaicSettings) -> T.Compose:
    """After `mosaic_canvas`: DEIM's affine over the canvas, then the strong pipeline without zoom-out and
    IoU crop (DEIM skips both for a mosaic sample), flip, square resize, tiny boxes dropped. The affine's
    boxes enclose the moved corners and are cut to the canvas (torchvision's box affine)."""
    return T.Compose([
        T.RandomAffine(degrees=settings.rotation, translate=(settings.translate, settings.translate),
                       scale=tuple(settings.scale), fill=0),
        PhotometricDistort(p=0.5),
        T.SanitizeBoundingBoxes(min_size=1),
        T.RandomHorizontalFlip(p=0.5),
        T.Resize((size, size), antialias=True),
        T.SanitizeBoundingBoxes(min_size=1),
    ])


def mixup_batch(images: torch.Tensor, targets: list[dict], ratio: float) -> tuple[torch.Tensor, list[dict]]:
    """DEIM's batch MixUp on a (B, 3, H, W) uint8 batch: image i becomes ratio x image i + (1 - ratio) x image
    i-1 (the first takes the last), rounded back to uint8; its boxes and labels are both images' (boxes are
    normalised to the common side, so they carry over as they are)."""
    previous = images.roll(shifts=1, dims=0)
    mixed = (images.float() * ratio + previous.float() * (1.0 - ratio)).round_().clamp_(0, 255).to(torch.uint8)
    shifted = targets[-1:] + targets[:-1]
    out = [{**t, "boxes": torch.cat([t["boxes"], s["boxes"]]), "labels": torch.cat([t["labels"], s["labels"]])}
           for t, s in zip(targets, shifted)]
    return mixed, out


def eval_transform(size: int) -> T.Compose:
    """Evaluation and prediction: the square resize alone (antialiased bilinear, as transformers' processor)."""
    return T.Compose([T.Resize((size, size), antialias=True)])
