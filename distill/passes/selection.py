"""From the merged per-class top-K to what gets written: the kept images, and the copies that fill short classes.

Fill copies cycle through a short class's images most confident first (copy j of the deficit repeats image
j mod n), and are written in a seeded random order so that repeats of one image spread over the fill shards
instead of sitting next to each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.passes.topk import ClassTopK


@dataclass
class Selection:
    k: int
    fill_mode: str
    # the kept images, class by class, most confident first: (cls, conf, unit, ordinal) arrays
    cls: np.ndarray
    conf: np.ndarray
    unit: np.ndarray
    ordinal: np.ndarray
    # the fill copies in writing order: which kept image (index into the arrays above) and its copy number
    fill_source: np.ndarray
    fill_copy: np.ndarray

    def kept_per_class(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.cls, minlength=num_classes)

    def repeated_per_class(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.cls[self.fill_source], minlength=num_classes)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_state_dict(cls, state: dict) -> "Selection":
        return cls(**state)


def plan_selection(top: ClassTopK, fill_mode: str, seed: int) -> Selection:
    s = top.state_dict()
    bits = s["conf_bits"].astype(np.int64)
    # class ascending, then most confident first (ties: the order the heap keeps, larger position first)
    order = np.lexsort((-s["ordinal"].astype(np.int64), -s["unit"].astype(np.int64), -bits, s["cls"]))
    cls = s["cls"][order].astype(np.int64)
    counts = np.bincount(cls, minlength=top.num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    fill_source, fill_copy = [], []
    if fill_mode == "repeat":
        for c in np.flatnonzero((counts > 0) & (counts < top.k)):
            extra = np.arange(top.k - counts[c])
            fill_source.append(starts[c] + extra % counts[c])
            fill_copy.append(extra // counts[c] + 1)
    fill_source = np.concatenate(fill_source) if fill_source else np.zeros(0, np.int64)
    fill_copy = np.concatenate(fill_copy) if fill_copy else np.zeros(0, np.int64)
    shuffle = np.random.default_rng(seed).permutation(len(fill_source))
    return Selection(
        top.k, fill_mode, cls, s["conf_bits"][order].view(np.float32), s["unit"][order].astype(np.int64),
        s["ordinal"][order].astype(np.int64), fill_source[shuffle].astype(np.int64), fill_copy[shuffle].astype(np.int64),
    )


def sample_key(unit: int, ordinal: int) -> str:
    """The output key of a kept image: where it came from in the pool (unit index, position)."""
    return f"u{unit:06d}_{ordinal:06d}"
