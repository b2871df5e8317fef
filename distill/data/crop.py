"""Where to cut: crops planned from the image size alone, before any pixel is decoded.

A planner draws a `Crop` (a box in the source image, the output size, a flip) from `(height, width, rng)`;
`cut` then takes that box out of pixels decoded at any scale and resizes it. Planning first lets the decoder
work at the smallest scale the box allows (`distill.data.decode`), while the crop's geometry relative to the
original image stays what the planner drew, whatever the decode scale.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Crop:
    """A box in source-image pixels (`top`, `left`, `height`, `width`, fractional allowed), resized to
    `out_h` x `out_w`, then mirrored left-right when `flip`."""

    top: float
    left: float
    height: float
    width: float
    out_h: int
    out_w: int
    flip: bool = False


class InceptionCrop:
    """The Inception crop (Szegedy et al. 2015), as torchvision's and timm's RandomResizedCrop draw it: area
    fraction uniform in `scale`, aspect ratio log-uniform in `ratio`, up to 10 tries for a box that fits,
    else the largest centred box within `ratio`; then a left-right flip with probability `flip`."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.5):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"Inception crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"Inception crop ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        self.size, self.scale, self.flip = int(size), tuple(scale), float(flip)
        self.ratio = tuple(ratio)
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, height: int, width: int, rng: random.Random) -> Crop:
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                break
        else:  # no try fitted: the whole image, cut to the nearest allowed aspect ratio
            aspect = width / height
            if aspect < self.ratio[0]:
                w, h = width, int(round(width / self.ratio[0]))
            elif aspect > self.ratio[1]:
                w, h = int(round(height * self.ratio[1])), height
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
        return Crop(top, left, h, w, self.size, self.size, rng.random() < self.flip)


class WholeImage:
    """The whole image resized to `size` x `size` (aspect ratio not kept), flipped with probability `flip`."""

    def __init__(self, size: int, flip: float = 0.5):
        self.size, self.flip = int(size), float(flip)

    def __call__(self, height: int, width: int, rng: random.Random) -> Crop:
        return Crop(0, 0, height, width, self.size, self.size, self.flip > 0 and rng.random() < self.flip)


class CentreCrop:
    """Evaluation: the shorter side resized to floor(size / crop_pct), then the centre size x size. Planned as
    the source box that maps onto that centre square (no randomness)."""

    def __init__(self, size: int, crop_pct: float = 0.875):
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size, self.resize_to = int(size), int(math.floor(size / crop_pct))

    def __call__(self, height: int, width: int, rng: random.Random) -> Crop:
        scale = self.resize_to / min(height, width)
        new_h, new_w = max(self.resize_to, round(height * scale)), max(self.resize_to, round(width * scale))
        side_h, side_w = min(self.size, new_h), min(self.size, new_w)
        top, left = (new_h - side_h) // 2, (new_w - side_w) // 2
        return Crop(top / scale, left / scale, side_h / scale, side_w / scale, self.size, self.size)


def source_box(crop: Crop, image_h: int, image_w: int, source_h: int, source_w: int) -> tuple[int, int, int, int]:
    """The crop's box in pixels of an image decoded at `image_h` x `image_w` from a `source_h` x `source_w`
    original, as integer (top, left, bottom, right), at least one pixel and inside the image."""
    sy, sx = image_h / source_h, image_w / source_w
    top, left = int(round(crop.top * sy)), int(round(crop.left * sx))
    bottom = int(round((crop.top + crop.height) * sy))
    right = int(round((crop.left + crop.width) * sx))
    top, left = min(max(top, 0), image_h - 1), min(max(left, 0), image_w - 1)
    return top, left, max(min(bottom, image_h), top + 1), max(min(right, image_w), left + 1)


def cut(image: np.ndarray, crop: Crop, source_h: int, source_w: int, flip: bool = True) -> np.ndarray:
    """The crop out of `image` (the source decoded at any scale), resized (bilinear) to the output size and,
    when `flip` is true, mirrored as the crop says (pass False to mirror later, e.g. in the final copy)."""
    top, left, bottom, right = source_box(crop, image.shape[0], image.shape[1], source_h, source_w)
    region = image[top:bottom, left:right]
    if region.shape[:2] != (crop.out_h, crop.out_w):
        region = cv2.resize(region, (crop.out_w, crop.out_h), interpolation=cv2.INTER_LINEAR)
    if flip and crop.flip:
        region = cv2.flip(region, 1)
    return region
