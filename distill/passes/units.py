"""Units of work for the passes: one webdataset shard, or one chunk of an image folder.

A unit is what a pass finishes or does not: progress is recorded per unit, units are split across processes,
and a sample is addressed by (unit index, ordinal), its position in the unit, so that a second pass can find
it again by re-reading the unit. Nothing here holds images beyond the one being read.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import cv2
import numpy as np

from distill.data.shards import CorruptSampleError, expand_shards, iter_shard

logger = logging.getLogger("distill")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Unit:
    index: int  # position in the pool's unit list: stable for a given pool spec
    name: str  # a shard path, or `folder:first-file` for a folder chunk
    files: tuple[str, ...] = ()  # a folder chunk's image files (absolute); empty for a shard
    folder: str = ""  # a folder chunk's pool folder: keys are file paths relative to it

    @property
    def tag(self) -> str:
        """A short name for file names and sample keys."""
        stem = Path(self.name).stem if not self.files else f"files{self.index:06d}"
        return _safe_key(stem)


@dataclass
class RawSample:
    ordinal: int
    key: str
    data: Optional[bytes]  # encoded image bytes, None when the sample has none
    label: int  # -1 when the pool has no labels
    where: str  # for messages: the key and its unit


def _safe_key(text: str) -> str:
    # webdataset splits a member name at the first dot of its base name: keys carry no dots
    return re.sub(r"[^0-9A-Za-z_/-]", "_", text)


def pool_units(shards: Optional[str | Sequence[str]], folder: Optional[str], root: str | Path,
               chunk: int = 1000) -> list[Unit]:
    """The units of an image pool given as shards (brace patterns / folders of tars) or as an image folder
    (searched recursively; files sorted, then cut into chunks of `chunk`)."""
    if bool(shards) == bool(folder):
        raise ValueError("give the image pool as exactly one of pool.shards or pool.folder")
    if shards:
        return [Unit(i, p) for i, p in enumerate(expand_shards(shards, root))]
    base = Path(folder) if os.path.isabs(folder) else Path(root) / folder
    if not base.is_dir():
        raise FileNotFoundError(f"pool.folder {base} is not a folder")
    files = sorted(str(p) for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"pool.folder {base} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [
        Unit(i, f"{base}:{Path(files[s]).relative_to(base)}", tuple(files[s:s + chunk]), str(base))
        for i, s in enumerate(range(0, len(files), chunk))
    ]


def rank_share(units: Sequence[Unit], rank: int, world: int) -> list[Unit]:
    return list(units[rank::world])


def iter_unit(unit: Unit) -> Iterator[RawSample]:
    """The raw samples of a unit, in a fixed order. A broken tar member is logged and passed over."""
    if unit.files:
        base = Path(unit.folder)
        for ordinal, path in enumerate(unit.files):
            key = _safe_key(str(Path(path).relative_to(base).with_suffix("")))
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                logger.warning("cannot read %s: %s", path, e)
                data = None
            yield RawSample(ordinal, key, data, -1, path)
        return

    def on_error(exc: Exception) -> bool:
        logger.warning("shard %s: %s: %s (passed over)", unit.name, type(exc).__name__, exc)
        return True

    for ordinal, sample in enumerate(iter_shard(unit.name, on_error)):
        key = str(sample.get("__key__"))
        data = next((sample[f] for f in IMAGE_FIELDS if f in sample), None)
        try:
            label = int(sample["cls"]) if "cls" in sample else -1
        except ValueError:
            label = -1
        yield RawSample(ordinal, key, data, label, f"sample {key!r} in {unit.name}")


def decode_image(sample: RawSample) -> np.ndarray:
    """Encoded bytes -> HWC uint8 RGB; CorruptSampleError naming the sample when they do not decode."""
    if sample.data is None:
        raise CorruptSampleError(f"{sample.where}: no image entry")
    image = cv2.imdecode(np.frombuffer(sample.data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise CorruptSampleError(f"{sample.where}: image bytes ({len(sample.data)} B) could not be decoded")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
