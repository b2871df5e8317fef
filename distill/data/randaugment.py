"""RandAugment as TensorFlow's TPU EfficientNet code defines it (`distort_image_with_randaugment` in
tensorflow/tpu models/official/efficientnet/autoaugment.py), the definition the MobileNetV4 paper's Google
training most likely used.

Each of `num_layers` layers picks one of 16 ops uniformly at random and always applies it, at one magnitude
m in [0, 10] shared by all ops. The level -> argument mapping (f = m / 10):

    AutoContrast, Equalize, Invert          no argument
    Rotate                                  +-30 f degrees (random sign)
    Posterize                               int(4 f) bits kept (more bits, i.e. weaker, as m grows)
    Solarize                                threshold int(256 f): pixels >= threshold are inverted
    Color, Contrast, Brightness, Sharpness  blend factor 1.8 f + 0.1 (1.0 at m = 5: no change)
    ShearX, ShearY                          +-0.3 f (random sign), anchored at the top-left corner
    TranslateX, TranslateY                  +-100 f pixels (random sign), whatever the image size
    Cutout                                  a square of half-side int(40 f) pixels at a uniform centre
    SolarizeAdd                             int(110 f) added to pixels below 128

Geometric ops sample the nearest pixel and fill what they move in with grey 128. Contrast blends towards
the number of pixels / 256 (the reference's histogram sum, not the mean grey level; clipped to 255), kept as
the reference has it. Blends here round where the reference truncates, and Color's grey uses OpenCV's
weights (0.299, 0.587, 0.114; the reference 0.2989, 0.587, 0.114): results differ by at most a grey level.

    ra = RandAugment(num_layers=2, magnitude=9)
    image = ra(image, rng)              # HWC uint8 RGB in, HWC uint8 RGB out; rng: random.Random
"""
from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import Callable

import cv2
import numpy as np

MAX_LEVEL = 10.0
FILL = 128  # grey for the pixels geometric ops and Cutout leave empty
TRANSLATE_PIXELS = 100.0
CUTOUT_PIXELS = 40.0

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")
SIGNED = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})  # a random sign per use


def _enhance(level: float) -> float:
    return (level / MAX_LEVEL) * 1.8 + 0.1


LEVEL_TO_ARG: dict[str, Callable[[float], float]] = {
    "AutoContrast": lambda level: 0,
    "Equalize": lambda level: 0,
    "Invert": lambda level: 0,
    "Rotate": lambda level: (level / MAX_LEVEL) * 30.0,
    "Posterize": lambda level: int((level / MAX_LEVEL) * 4),
    "Solarize": lambda level: int((level / MAX_LEVEL) * 256),
    "Color": _enhance,
    "Contrast": _enhance,
    "Brightness": _enhance,
    "Sharpness": _enhance,
    "ShearX": lambda level: (level / MAX_LEVEL) * 0.3,
    "ShearY": lambda level: (level / MAX_LEVEL) * 0.3,
    "TranslateX": lambda level: (level / MAX_LEVEL) * TRANSLATE_PIXELS,
    "TranslateY": lambda level: (level / MAX_LEVEL) * TRANSLATE_PIXELS,
    "Cutout": lambda level: int((level / MAX_LEVEL) * CUTOUT_PIXELS),
    "SolarizeAdd": lambda level: int((level / MAX_LEVEL) * 110),
}


# --------------------------------------------------------------------------------------------------
# The ops: HWC uint8 RGB in, a new HWC uint8 RGB array out (the input is never written to).
# --------------------------------------------------------------------------------------------------

_IDENTITY = np.arange(256, dtype=np.float32)


def _lut(values: np.ndarray) -> np.ndarray:
    """Float values per grey level -> a uint8 lookup table, clipped, then truncated as a float -> uint8
    cast truncates."""
    return np.clip(values, 0, 255).astype(np.uint8)


@lru_cache(maxsize=64)
def _blend_lut(degenerate: float, factor: float) -> np.ndarray:
    """The reference's blend(degenerate, image, factor) for a constant degenerate image, as a table."""
    if factor == 0.0:
        return _lut(np.full(256, degenerate, np.float32))
    return _lut(np.float32(degenerate) + np.float32(factor) * (_IDENTITY - np.float32(degenerate)))


def _blend(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0:
        return image.copy()
    return cv2.addWeighted(image, factor, degenerate, 1.0 - factor, 0.0)


def _warp(image: np.ndarray, matrix: list[list[float]]) -> np.ndarray:
    """Output pixel (x, y) takes input pixel round(matrix @ (x, y, 1)); outside the image -> grey."""
    return cv2.warpAffine(image, np.asarray(matrix, np.float64), (image.shape[1], image.shape[0]),
                          flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(FILL, FILL, FILL))


def auto_contrast(image: np.ndarray) -> np.ndarray:
    """Each channel stretched so its lowest value becomes 0 and its highest 255 (flat channels kept)."""
    lut = np.empty((256, 1, 3), np.uint8)
    for c, plane in enumerate(cv2.split(image)):
        lo, hi, _, _ = cv2.minMaxLoc(plane)
        if hi > lo:
            scale = np.float32(255.0 / (hi - lo))
            lut[:, 0, c] = _lut(_IDENTITY * scale - np.float32(lo) * scale)
        else:
            lut[:, 0, c] = np.arange(256)
    return cv2.LUT(image, lut)


def equalize(image: np.ndarray) -> np.ndarray:
    """PIL's histogram equalisation per channel."""
    lut = np.empty((256, 1, 3), np.uint8)
    for c in range(3):
        hist = cv2.calcHist([image], [c], None, [256], [0, 256]).ravel().astype(np.int64)
        nonzero = hist[hist > 0]
        step = (int(nonzero.sum()) - int(nonzero[-1])) // 255
        if step == 0:
            lut[:, 0, c] = np.arange(256)
            continue
        table = (np.cumsum(hist) + step // 2) // step
        lut[:, 0, c] = np.clip(np.concatenate([[0], table[:-1]]), 0, 255)
    return cv2.LUT(image, lut)


def invert(image: np.ndarray) -> np.ndarray:
    return cv2.bitwise_not(image)


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation about the image centre (pixel-index coordinates, as the reference's projective transform)."""
    h, w = image.shape[:2]
    rad = math.radians(degrees)
    cos, sin = math.cos(rad), math.sin(rad)
    x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
    y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
    return _warp(image, [[cos, -sin, x_off], [sin, cos, y_off]])


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
    shift = 8 - int(bits)
    return cv2.bitwise_and(image, np.full(3, (0xFF << shift) & 0xFF, np.float64))


@lru_cache(maxsize=64)
def _solarize_lut(threshold: int, addition: int) -> np.ndarray:
    """Below `threshold`: + `addition` (clipped), or kept when `addition` is None; at or above: kept, or
    inverted when `addition` is None."""
    values = np.arange(256)
    if addition is None:
        return np.where(values < threshold, values, 255 - values).astype(np.uint8)
    return np.where(values < threshold, np.clip(values + addition, 0, 255), values).astype(np.uint8)


def solarize(image: np.ndarray, threshold: int) -> np.ndarray:
    return cv2.LUT(image, _solarize_lut(int(threshold), None))


def solarize_add(image: np.ndarray, addition: int, threshold: int = 128) -> np.ndarray:
    return cv2.LUT(image, _solarize_lut(int(threshold), int(addition)))


def color(image: np.ndarray, factor: float) -> np.ndarray:
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return _blend(grey, image, factor)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    # The reference blends towards sum(grey histogram) / 256, i.e. the pixel count / 256, clipped to 255.
    degenerate = float(int(min(image.shape[0] * image.shape[1] / 256.0, 255.0)))
    return cv2.LUT(image, _blend_lut(degenerate, factor))


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return cv2.LUT(image, _blend_lut(0.0, factor))


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with PIL's SMOOTH-filtered image; the one-pixel border stays the original's."""
    if factor == 1.0:
        return image.copy()
    smooth = image.copy()
    if image.shape[0] > 2 and image.shape[1] > 2:
        smooth[1:-1, 1:-1] = cv2.filter2D(image, -1, _SMOOTH)[1:-1, 1:-1]
    return _blend(smooth, image, factor)


def shear_x(image: np.ndarray, level: float) -> np.ndarray:
    return _warp(image, [[1.0, level, 0.0], [0.0, 1.0, 0.0]])


def shear_y(image: np.ndarray, level: float) -> np.ndarray:
    return _warp(image, [[1.0, 0.0, 0.0], [level, 1.0, 0.0]])


def translate_x(image: np.ndarray, pixels: float) -> np.ndarray:
    """Content moves left by `pixels` (output x shows input x + pixels)."""
    return _warp(image, [[1.0, 0.0, pixels], [0.0, 1.0, 0.0]])


def translate_y(image: np.ndarray, pixels: float) -> np.ndarray:
    return _warp(image, [[1.0, 0.0, 0.0], [0.0, 1.0, pixels]])


def cutout(image: np.ndarray, half: int, centre: tuple[int, int]) -> np.ndarray:
    """Grey square rows [cy - half, cy + half) x columns [cx - half, cx + half), clipped to the image."""
    out = image.copy()
    cy, cx = centre
    out[max(0, cy - half):max(0, cy + half), max(0, cx - half):max(0, cx + half)] = FILL
    return out


_APPLY: dict[str, Callable] = {
    "AutoContrast": lambda image, arg: auto_contrast(image),
    "Equalize": lambda image, arg: equalize(image),
    "Invert": lambda image, arg: invert(image),
    "Rotate": rotate,
    "Posterize": posterize,
    "Solarize": solarize,
    "Color": color,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "SolarizeAdd": solarize_add,
}


class RandAugment:
    """`num_layers` ops, each drawn uniformly from the 16 and always applied, at `magnitude` (0-10)."""

    def __init__(self, num_layers: int = 2, magnitude: float = 9):
        if num_layers < 0:
            raise ValueError(f"num_ops must be >= 0, got {num_layers}")
        if not 0 <= magnitude <= MAX_LEVEL:
            raise ValueError(f"RandAugment magnitude must be in [0, {MAX_LEVEL:g}], got {magnitude}")
        self.num_layers, self.magnitude = int(num_layers), float(magnitude)
        self.args = {name: LEVEL_TO_ARG[name](self.magnitude) for name in OPS}

    def apply(self, name: str, image: np.ndarray, rng: random.Random) -> np.ndarray:
        """One op at this magnitude, drawing its sign (or Cutout's centre) from `rng`."""
        arg = self.args[name]
        if name in SIGNED and rng.random() < 0.5:
            arg = -arg
        if name == "Cutout":
            return cutout(image, arg, (rng.randrange(image.shape[0]), rng.randrange(image.shape[1])))
        return _APPLY[name](image, arg)

    def __call__(self, image: np.ndarray, rng: random.Random) -> np.ndarray:
        for _ in range(self.num_layers):
            image = self.apply(OPS[rng.randrange(len(OPS))], image, rng)
        return image

    def __repr__(self) -> str:
        return f"RandAugment(num_layers={self.num_layers}, magnitude={self.magnitude:g})"
