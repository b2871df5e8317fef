"""Augmentation presets by name, run per sample in the loader's CPU workers (albumentations, OpenCV-backed).

A preset maps an HWC uint8 RGB image to a CHW uint8 array of `img_size` x `img_size`. It does not convert
to float or normalise: that happens per batch on the device, where it is cheap.

    augment = create_augment("inception_randaug", 224, num_ops=2, magnitude=9)
    chw = augment(hwc_uint8)

New presets register with `@register_preset("name")` on a function `(img_size, **params) -> list of
albumentations transforms`; its keyword arguments are the preset's parameters.
"""
from __future__ import annotations

import inspect
import math
import random
from typing import Any, Callable, Optional

import albumentations as A
import cv2
import numpy as np

_PRESETS: dict[str, Callable[..., list]] = {}

GRAY = (128, 128, 128)  # fill for pixels that geometric ops move in, as timm's RandAugment does


def register_preset(name: str):
    def wrap(fn: Callable[..., list]) -> Callable[..., list]:
        if name in _PRESETS:
            raise ValueError(f"augmentation preset {name!r} is already registered")
        _PRESETS[name] = fn
        return fn

    return wrap


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def preset_params(name: str) -> dict[str, Any]:
    """A preset's parameters and their defaults. Unknown name -> ValueError listing the presets."""
    if name not in _PRESETS:
        raise ValueError(f"unknown augmentation preset {name!r}; valid presets: {list_presets()}")
    sig = inspect.signature(_PRESETS[name])
    return {k: p.default for k, p in sig.parameters.items() if k != "img_size"}


def check_augment(name: str, params: dict[str, Any]) -> None:
    """Raise ValueError for an unknown preset or parameter, naming the valid ones."""
    valid = preset_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"augmentation preset {name!r}: unknown parameters {unknown}; valid: {sorted(valid)}")


class Augment:
    """HWC uint8 -> CHW uint8 (contiguous numpy). Picklable, so DataLoader workers can receive it."""

    def __init__(self, name: str, transforms: list, seed: Optional[int] = None):
        self.name = name
        self.pipeline = A.Compose(transforms)
        # One generator pair shared by every transform: albumentations' own seeding gives each transform a
        # generator seeded alike, so the draws of different transforms (crop size, flip, op choice) correlate.
        self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def reseed(self, seed: int) -> None:
        """Restart the random stream from `seed`, in place (about 10 us): the stream seeds it per sample, so a
        sample's augmentation depends on its position alone."""
        self.pipeline.random_generator.bit_generator.state = np.random.PCG64(seed).state
        self.pipeline.py_random.seed(seed)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        out = self.pipeline(image=image)["image"]
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def __repr__(self) -> str:
        return f"Augment({self.name!r}, {self.pipeline.transforms})"


def create_augment(name: str, img_size: int, seed: Optional[int] = None, **params) -> Augment:
    check_augment(name, params)
    return Augment(name, _PRESETS[name](img_size, **params), seed)


# --------------------------------------------------------------------------------------------------
# RandAugment from albumentations ops. Magnitude m in [0, 10] sets every op's strength (as timm's
# `rand-m{m}-n{n}`): strength grows with m for all ops, signed ops take a random sign, and each chosen
# op applies with probability 0.5. SolarizeAdd has no albumentations counterpart and is left out.
# --------------------------------------------------------------------------------------------------


def _signed(make: Callable[[float], A.BasicTransform], value: float) -> A.BaseCompose:
    return A.OneOf([make(value), make(-value)], p=0.5)


def randaugment_ops(magnitude: float) -> list:
    if not 0 <= magnitude <= 10:
        raise ValueError(f"RandAugment magnitude must be in [0, 10], got {magnitude}")
    f = magnitude / 10.0
    enhance = 0.9 * f  # colour / contrast / brightness / sharpness factor offset from 1

    def affine(**kw):
        return A.Affine(**kw, fill=GRAY, border_mode=cv2.BORDER_CONSTANT, p=1.0)

    def jitter(**factors):  # one fixed ColorJitter factor, the others identity
        kw = {"brightness": (1, 1), "contrast": (1, 1), "saturation": (1, 1), "hue": (0, 0), **factors}
        return A.ColorJitter(**kw, p=1.0)

    return [
        A.AutoContrast(p=0.5),
        A.Equalize(p=0.5),
        A.InvertImg(p=0.5),
        _signed(lambda v: affine(rotate=(v, v)), 30.0 * f),
        A.Posterize(num_bits=min(7, 8 - int(round(4 * f))), p=0.5),  # albumentations caps bits at 7
        A.Solarize(threshold_range=(1 - f, 1 - f), p=0.5),
        _signed(lambda v: jitter(saturation=(1 + v, 1 + v)), enhance),
        _signed(lambda v: jitter(contrast=(1 + v, 1 + v)), enhance),
        _signed(lambda v: jitter(brightness=(1 + v, 1 + v)), enhance),
        A.Sharpen(alpha=(min(enhance, 1.0),) * 2, lightness=(1.0, 1.0), p=0.5),
        _signed(lambda v: affine(shear={"x": (v, v), "y": (0, 0)}), math.degrees(math.atan(0.3 * f))),
        _signed(lambda v: affine(shear={"x": (0, 0), "y": (v, v)}), math.degrees(math.atan(0.3 * f))),
        _signed(lambda v: affine(translate_percent={"x": (v, v), "y": (0, 0)}), 0.45 * f),
        _signed(lambda v: affine(translate_percent={"x": (0, 0), "y": (v, v)}), 0.45 * f),
    ]


def _inception_crop(img_size: int, min_scale: float) -> list:
    return [A.RandomResizedCrop(size=(img_size, img_size), scale=(min_scale, 1.0)), A.HorizontalFlip(p=0.5)]


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


@register_preset("inception_randaug")
def inception_randaug(img_size: int, num_ops: int = 2, magnitude: float = 9, min_scale: float = 0.08) -> list:
    """Inception crop + flip, then RandAugment (the paper's D1 at magnitude 9, D3 at 5)."""
    if num_ops < 0:
        raise ValueError(f"num_ops must be >= 0, got {num_ops}")
    ops = [A.SomeOf(randaugment_ops(magnitude), n=int(num_ops), replace=True, p=1.0)] if num_ops else []
    return _inception_crop(img_size, min_scale) + ops


@register_preset("inception")
def inception(img_size: int, min_scale: float = 0.08) -> list:
    """Inception crop + flip only (the paper's D2, where mixup is applied per batch on the device)."""
    return _inception_crop(img_size, min_scale)


@register_preset("flip")
def flip(img_size: int) -> list:
    """Left-right flip only, for stored views with offline teacher labels (resized if stored at another size)."""
    return [A.Resize(img_size, img_size, p=1.0), A.HorizontalFlip(p=0.5)]


@register_preset("eval")
def eval_center(img_size: int, crop_pct: float = 0.875) -> list:
    """Resize the shorter side to img_size / crop_pct, then take the centre img_size crop."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return [A.SmallestMaxSize(max_size=int(math.floor(img_size / crop_pct))), A.CenterCrop(img_size, img_size)]
