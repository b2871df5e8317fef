"""Encoded image bytes -> HWC uint8 RGB pixels, decoding no more than a crop needs.

JPEG goes through libjpeg-turbo (the copy bundled with simplejpeg) straight to RGB, with no separate colour
conversion pass, and can be decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, which skips most of the
inverse-DCT and colour work. Everything else (PNG, GIF, ...) goes through OpenCV at full size.

    size = jpeg_size(data)                        # (height, width) from the header, or None: not a JPEG
    image = decode_rgb(data, reduction=2)         # about half the height and width

EXIF orientation is ignored, as PIL (and so timm) and TensorFlow's decoders do: the pixels come out as stored.
Region-of-interest decoding (only the rows and columns of a crop) would save more; no well-kept Python binding
of libjpeg-turbo offers it today, so a crop still decodes whole rows and columns at the chosen scale.
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
import simplejpeg

REDUCTIONS = (1, 2, 4, 8)  # libjpeg-turbo's fast DCT scales; others (3/8, 7/8, ...) decode slower than full size

_READ_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


class DecodeError(ValueError):
    """Bytes that are not a readable image."""


def jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
    """(height, width) of a JPEG from its header alone (about 1 µs), or None when `data` is not a JPEG."""
    if bytes(data[:3]) != b"\xff\xd8\xff":  # start-of-image marker (simplejpeg.is_jpeg refuses truncated files)
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # a broken header: let the full decoder report it
    return int(height), int(width)


def reduction_for(box_h: float, box_w: float, out_h: int, out_w: int, limit: int = 8) -> int:
    """The largest DCT reduction that keeps a `box_h` x `box_w` region at least `out_h` x `out_w` pixels, so
    the resize after it still only shrinks (a smaller decode would have to be enlarged again)."""
    best = 1
    for r in REDUCTIONS:
        if r <= limit and box_h >= r * out_h and box_w >= r * out_w:
            best = r
    return best


def decode_rgb(data: bytes, reduction: int = 1) -> np.ndarray:
    """HWC uint8 RGB. JPEG at 1/`reduction` scale (the size rounds up: ceil(h / reduction)); other formats
    at full size whatever `reduction` is. Raises DecodeError for bytes no decoder reads.

    Recoverable JPEG damage (a truncated file, extra bytes before a marker) decodes as far as it can, as
    PIL and OpenCV do, rather than losing the image."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction}")
    size = jpeg_size(data)
    if size is not None:
        height, width = size
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False,
                                          min_height=-(-height // reduction), min_width=-(-width // reduction))
        except ValueError:
            pass  # e.g. an arithmetic-coded or 12-bit JPEG: OpenCV may still read it
    image = cv2.imdecode(np.frombuffer(data, np.uint8), _READ_FLAGS)
    if image is None:
        raise DecodeError(f"image bytes ({len(data)} B) could not be decoded")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
