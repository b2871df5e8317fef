"""Augmentation presets by name, run per sample in the loader's CPU workers.

A preset maps an image to a CHW uint8 array of `img_size` x `img_size`. It does not convert to float or
normalise: that happens per batch on the device, where it is cheap. It takes either decoded pixels (HWC uint8
RGB) or the encoded bytes; given bytes, it plans its crop from the image header first and decodes only at the
scale that crop needs (`distill.data.decode`), with the crop's geometry unchanged.

    augment = create_augment("inception_randaug_tf", 224, num_ops=2, magnitude=9)
    augment.reseed(seed)                 # per sample or per worker; the same seed gives the same output
    chw = augment(jpeg_bytes)            # or augment(hwc_uint8)

A preset is a function `(img_size, **params) -> Preset` registered with `@register_preset("name")`; its keyword
arguments are the preset's parameters. A `Preset` is a crop planner (`distill.data.crop`) and optional pixel
ops `(image, rng) -> image` run on the crop's output, or a list of albumentations transforms run on the whole
decoded image.
"""
from __future__ import annotations

import inspect
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import albumentations as A
import cv2
import numpy as np

from distill.data.crop import CentreCrop, Crop, InceptionCrop, WholeImage, cut
from distill.data.decode import decode_rgb, jpeg_size, reduction_for
from distill.data.randaugment import RandAugment

GRAY = (128, 128, 128)  # fill for pixels that geometric ops move in, as both RandAugment definitions do


@dataclass
class Preset:
    """`crop` (height, width, rng) -> Crop, then `ops` (image, rng) -> image on the crop's output; or
    `transforms`, albumentations transforms on the whole decoded image (no planned crop)."""

    crop: Optional[Callable[[int, int, random.Random], Crop]] = None
    ops: Optional[Callable[[np.ndarray, random.Random], np.ndarray]] = None
    transforms: Optional[list] = None


_PRESETS: dict[str, Callable[..., Preset]] = {}


def register_preset(name: str):
    def wrap(fn: Callable[..., Preset]) -> Callable[..., Preset]:
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
    """Image (HWC uint8 RGB array, or encoded bytes) -> CHW uint8 (contiguous numpy). Picklable, so
    DataLoader workers can receive it. All its randomness comes from one generator that `reseed` resets."""

    def __init__(self, name: str, preset: Preset, seed: Optional[int] = None):
        self.name, self.preset = name, preset
        self.rng = random.Random()
        self.pipeline = None
        if preset.transforms is not None:
            self.pipeline = A.Compose(preset.transforms)
            self._np_rng = np.random.Generator(np.random.PCG64())
            # One shared stream for every transform (albumentations' own seeding gives each transform a
            # generator of the same seed, and re-creates them all: ~0.3 ms a call).
            self.pipeline.set_random_state(self._np_rng, self.rng)
        self.reseed(seed)

    def reseed(self, seed: Optional[int]) -> None:
        """Restart this copy's random stream from `seed` (a few µs). Each loader worker must reseed, or the
        workers augment alike; a stream that reseeds per sample gets per-sample reproducibility."""
        self.rng.seed(seed)
        if self.pipeline is not None:
            self._np_rng.bit_generator.state = np.random.PCG64(self.rng.getrandbits(64)).state

    def plan(self, height: int, width: int) -> Crop:
        """Draw the crop for an image of this size (the next draw of this copy's random stream)."""
        if self.preset.crop is None:
            raise TypeError(f"augmentation preset {self.name!r} crops inside albumentations: it plans no crop")
        return self.preset.crop(height, width, self.rng)

    def __call__(self, image: Union[np.ndarray, bytes, bytearray, memoryview]) -> np.ndarray:
        if not isinstance(image, np.ndarray):
            size = jpeg_size(image) if self.pipeline is None else None
            if size is None:
                image = decode_rgb(image)
            else:  # plan on the header, decode at the scale the crop allows
                crop = self.plan(*size)
                scaled = decode_rgb(image, reduction_for(crop.height, crop.width, crop.out_h, crop.out_w))
                return self._finish(scaled, crop, *size)
        if self.pipeline is not None:
            return np.ascontiguousarray(self.pipeline(image=image)["image"].transpose(2, 0, 1))
        return self._finish(image, self.plan(*image.shape[:2]), *image.shape[:2])

    def _finish(self, image: np.ndarray, crop: Crop, source_h: int, source_w: int) -> np.ndarray:
        ops = self.preset.ops
        out = cut(image, crop, source_h, source_w, flip=ops is not None)  # flip before the ops, as planned
        if ops is not None:
            return np.ascontiguousarray(ops(out, self.rng).transpose(2, 0, 1))
        if crop.flip:
            out = out[:, ::-1]  # folded into the one copy to CHW
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def __repr__(self) -> str:
        inner = self.pipeline.transforms if self.pipeline is not None else (self.preset.crop, self.preset.ops)
        return f"Augment({self.name!r}, {inner})"


def create_augment(name: str, img_size: int, seed: Optional[int] = None, **params) -> Augment:
    check_augment(name, params)
    return Augment(name, _PRESETS[name](img_size, **params), seed)


# --------------------------------------------------------------------------------------------------
# RandAugment as timm's "increasing" variant does it, from albumentations ops. Magnitude m in [0, 10] sets
# every op's strength (as timm's `rand-m{m}-n{n}`): strength grows with m for all ops, signed ops take a
# random sign, and each chosen op applies with probability 0.5. SolarizeAdd has no albumentations
# counterpart and is left out. The TensorFlow definition is in `distill.data.randaugment`.
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


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


@register_preset("inception_randaug_tf")
def inception_randaug_tf(img_size: int, num_ops: int = 2, magnitude: float = 9, min_scale: float = 0.08) -> Preset:
    """Inception crop + flip, then RandAugment as TensorFlow's TPU EfficientNet code defines it (every layer
    applies one of 16 ops; `distill.data.randaugment`). The paper's D1 at magnitude 9, D3 at 5."""
    ops = RandAugment(num_ops, magnitude)
    return Preset(InceptionCrop(img_size, (min_scale, 1.0)), ops if ops.num_layers else None)


@register_preset("inception_randaug")
def inception_randaug(img_size: int, num_ops: int = 2, magnitude: float = 9, min_scale: float = 0.08) -> Preset:
    """Inception crop + flip, then timm-style "increasing" RandAugment from albumentations ops, each chosen
    op applied with probability 0.5 (not the TensorFlow definition: see `inception_randaug_tf`)."""
    if num_ops < 0:
        raise ValueError(f"num_ops must be >= 0, got {num_ops}")
    ops = [A.SomeOf(randaugment_ops(magnitude), n=int(num_ops), replace=True, p=1.0)] if num_ops else []
    crop = [A.RandomResizedCrop(size=(img_size, img_size), scale=(min_scale, 1.0)), A.HorizontalFlip(p=0.5)]
    return Preset(transforms=crop + ops)


@register_preset("inception")
def inception(img_size: int, min_scale: float = 0.08) -> Preset:
    """Inception crop + flip only (the paper's D2, where mixup is applied per batch on the device)."""
    return Preset(InceptionCrop(img_size, (min_scale, 1.0)))


@register_preset("flip")
def flip(img_size: int) -> Preset:
    """Left-right flip only, for stored views with offline teacher labels (resized if stored at another size)."""
    return Preset(WholeImage(img_size, flip=0.5))


@register_preset("eval")
def eval_center(img_size: int, crop_pct: float = 0.875) -> Preset:
    """Resize the shorter side to img_size / crop_pct, then take the centre img_size crop."""
    return Preset(CentreCrop(img_size, crop_pct))
