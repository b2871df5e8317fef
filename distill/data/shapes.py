"""Drawing primitives for the generated datasets: shapes, fill textures, colours and cluttered backgrounds.

Everything draws with OpenCV on HWC uint8 RGB arrays in place and is driven by a `np.random.Generator`,
so a dataset built from these is reproducible from its seed.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import cv2
import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
TEXTURES: tuple[str, ...] = ("solid", "stripes", "checker", "dots")
# Saturated, mutually distinct colours (far apart in RGB so that a colour stays recognisable under jitter).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40),    # red
    (40, 170, 60),    # green
    (40, 80, 220),    # blue
    (240, 200, 30),   # yellow
    (200, 50, 200),   # magenta
    (30, 200, 210),   # cyan
    (245, 130, 20),   # orange
    (245, 245, 245),  # white
    (25, 25, 25),     # black
    (130, 70, 20),    # brown
)
PALETTE_NAMES: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white", "black", "brown",
)
assert len(PALETTE_NAMES) == len(PALETTE)

_SUBPIXEL_BITS = 4  # cv2 `shift`: vertices carry 1/16 px precision, so small shapes keep their geometry
_SCALE = 1 << _SUBPIXEL_BITS

Color = Union[Sequence[int], np.ndarray]


# --------------------------------------------------------------------------------------------------
# Backgrounds
# --------------------------------------------------------------------------------------------------


def random_background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth, varied background: coarse colour noise upsampled, a tilted gradient, fine grain."""
    cells = int(rng.integers(2, 7))
    base = rng.uniform(40, 215, size=3)
    spread = rng.uniform(10, 70)
    coarse = np.clip(base + rng.normal(0, spread, size=(cells, cells, 3)), 0, 255).astype(np.float32)
    img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = (math.cos(theta) * xs / max(w, 1) + math.sin(theta) * ys / max(h, 1))
    img += (rng.uniform(-40, 40) * ramp)[..., None]
    img += rng.normal(0, rng.uniform(2, 10), size=(h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Shape outlines: a name -> function that draws a filled mask of that shape
# --------------------------------------------------------------------------------------------------


def _rotate(points: np.ndarray, center: tuple[float, float], angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return points @ rot.T + np.asarray(center)


def _regular_polygon(n: int, radius: float, phase_deg: float = -90.0) -> np.ndarray:
    t = np.radians(phase_deg) + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1) * radius


def _fill_polygon(mask: np.ndarray, points: np.ndarray) -> None:
    pts = np.round(points * _SCALE).astype(np.int32)[None]
    cv2.fillPoly(mask, pts, 255, lineType=cv2.LINE_AA, shift=_SUBPIXEL_BITS)


def _circle(mask, center, size, angle):
    c = tuple(int(round(v * _SCALE)) for v in center)
    cv2.circle(mask, c, int(round(size / 2 * _SCALE)), 255, -1, cv2.LINE_AA, _SUBPIXEL_BITS)


def _ring(mask, center, size, angle):
    c = tuple(int(round(v * _SCALE)) for v in center)
    outer, thickness = size / 2, max(size * 0.16, 1.5)
    # a thick outline of the mid radius: filled annulus of width `thickness` ending at `outer`
    cv2.circle(mask, c, int(round((outer - thickness / 2) * _SCALE)), 255, int(round(thickness)),
               cv2.LINE_AA, _SUBPIXEL_BITS)


def _square(mask, center, size, angle):
    h = size / 2 * 0.85  # slightly smaller so a square's area is near a circle's of the same size
    _fill_polygon(mask, _rotate(np.array([[-h, -h], [h, -h], [h, h], [-h, h]]), center, angle))


def _diamond(mask, center, size, angle):
    h = size / 2
    _fill_polygon(mask, _rotate(np.array([[0, -h], [h * 0.7, 0], [0, h], [-h * 0.7, 0]]), center, angle))


def _triangle(mask, center, size, angle):
    _fill_polygon(mask, _rotate(_regular_polygon(3, size / 2), center, angle))


def _hexagon(mask, center, size, angle):
    _fill_polygon(mask, _rotate(_regular_polygon(6, size / 2, 0.0), center, angle))


def _star(mask, center, size, angle):
    outer = _regular_polygon(5, size / 2)
    inner = _regular_polygon(5, size / 2 * 0.42, -90.0 + 36.0)
    points = np.stack([outer, inner], 1).reshape(-1, 2)
    _fill_polygon(mask, _rotate(points, center, angle))


def _cross(mask, center, size, angle):
    h, t = size / 2, size * 0.17
    arm = np.array([[-t, -h], [t, -h], [t, -t], [h, -t], [h, t], [t, t], [t, h], [-t, h], [-t, t], [-h, t],
                    [-h, -t], [-t, -t]])
    _fill_polygon(mask, _rotate(arm, center, angle))


_OUTLINES: dict[str, Callable] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "star": _star, "cross": _cross,
    "ring": _ring, "diamond": _diamond, "hexagon": _hexagon,
}
assert set(_OUTLINES) == set(SHAPES)


# --------------------------------------------------------------------------------------------------
# Fill textures: a name -> function giving a (h, w) bool pattern; True takes the secondary colour
# --------------------------------------------------------------------------------------------------


def _grid(h, w, period, angle):
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    a = math.radians(angle)
    u = xs * math.cos(a) + ys * math.sin(a)
    v = -xs * math.sin(a) + ys * math.cos(a)
    return u / period, v / period


def _stripes(h, w, period, angle):
    u, _ = _grid(h, w, period, angle)
    return (np.floor(u) % 2).astype(bool)


def _checker(h, w, period, angle):
    u, v = _grid(h, w, period, angle)
    return ((np.floor(u) + np.floor(v)) % 2).astype(bool)


def _dots(h, w, period, angle):
    u, v = _grid(h, w, period, angle)
    du, dv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
    return (du * du + dv * dv) < 0.09


_PATTERNS: dict[str, Callable] = {"stripes": _stripes, "checker": _checker, "dots": _dots}
assert set(_PATTERNS) | {"solid"} == set(TEXTURES)


def _secondary(color: np.ndarray) -> np.ndarray:
    """The texture's second colour: a darker tone of a light colour, a lighter tone of a dark one."""
    return color * 0.35 if color.mean() > 100 else color + (255 - color) * 0.55


# --------------------------------------------------------------------------------------------------


def draw_shape(
    img: np.ndarray,
    shape: str,
    center_xy: tuple[float, float],
    size: float,
    color: Color,
    angle: float = 0.0,
    texture: Union[str, bool] = "solid",
    rng: Optional[np.random.Generator] = None,
) -> tuple[float, float, float, float]:
    """Draw one anti-aliased, filled shape into `img` (HWC uint8 RGB) in place.

    `size` is the shape's outer diameter in pixels, `angle` a rotation in degrees. `texture` is a name from
    TEXTURES, or True for one picked at random (False: solid). `rng` varies the texture's period and
    orientation; without it they follow from the size and angle. Returns the tight box (x0, y0, x1, y1) of
    the drawn pixels, clipped to the image (a zero-size box at the clipped centre when nothing is visible).
    """
    if shape not in _OUTLINES:
        raise ValueError(f"unknown shape {shape!r}; valid shapes: {list(SHAPES)}")
    if isinstance(texture, (bool, np.bool_)):
        texture = str(rng.choice(TEXTURES[1:])) if texture and rng is not None else ("stripes" if texture else "solid")
    if texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; valid textures: {list(TEXTURES)}")
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"draw_shape needs an HWC uint8 RGB image, got shape {img.shape} dtype {img.dtype}")
    h, w = img.shape[:2]
    cx, cy = float(center_xy[0]), float(center_xy[1])

    # Draw in a window around the shape only: cost scales with the shape, not the image.
    r = size / 2 + 2
    x0, y0 = max(int(math.floor(cx - r)), 0), max(int(math.floor(cy - r)), 0)
    x1, y1 = min(int(math.ceil(cx + r)) + 1, w), min(int(math.ceil(cy + r)) + 1, h)
    if x1 <= x0 or y1 <= y0:
        px, py = float(np.clip(cx, 0, w)), float(np.clip(cy, 0, h))
        return px, py, px, py
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    _OUTLINES[shape](mask, (cx - x0, cy - y0), float(size), float(angle))

    color = np.asarray(color, np.float32)[:3]
    fill = np.broadcast_to(color, mask.shape + (3,))
    if texture != "solid":
        period = max(size / (rng.uniform(3.0, 5.0) if rng is not None else 4.0), 1.5)
        tex_angle = float(rng.uniform(0, 180)) if rng is not None else angle + 45.0
        pattern = _PATTERNS[texture](mask.shape[0], mask.shape[1], period, tex_angle)
        fill = np.where(pattern[..., None], _secondary(color), color)

    alpha = mask.astype(np.float32)[..., None] / 255.0
    window = img[y0:y1, x0:x1]
    window[:] = np.clip(window * (1 - alpha) + fill * alpha + 0.5, 0, 255).astype(np.uint8)

    ys, xs = np.nonzero(mask >= 128)  # the half-coverage outline: where the shape visibly is
    if len(xs) == 0:
        px, py = float(np.clip(cx, 0, w)), float(np.clip(cy, 0, h))
        return px, py, px, py
    return float(xs.min() + x0), float(ys.min() + y0), float(xs.max() + 1 + x0), float(ys.max() + 1 + y0)
