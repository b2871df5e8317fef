"""The K most confident images of each class, kept as one bounded min-heap per class.

An entry is a reference to an image, never the image: (confidence, unit, ordinal), where `unit` is the index
of the shard (or folder chunk) in the pool and `ordinal` the sample's position in it. Each entry is packed
into one Python int, `float32 bits of the confidence << 64 | unit << 32 | ordinal`, so that `heapq` compares
it natively (non-negative floats order like their IEEE bit patterns) and it costs ~44 bytes instead of the
~150 of a tuple. Equal confidences order by (unit, ordinal): deterministic whatever the arrival order.
"""
from __future__ import annotations

import heapq
from typing import Iterable, Sequence

import numpy as np

_LOW = (1 << 32) - 1


def pack(conf: float, unit: int, ordinal: int) -> int:
    bits = int(np.float32(conf).view(np.uint32))
    return (bits << 64) | ((int(unit) & _LOW) << 32) | (int(ordinal) & _LOW)


def unpack(entry: int) -> tuple[float, int, int]:
    conf = float(np.uint32(entry >> 64).view(np.float32))
    return conf, (entry >> 32) & _LOW, entry & _LOW


class ClassTopK:
    """Per-class bounded min-heaps: the root is the least confident entry kept, replaced when beaten."""

    def __init__(self, num_classes: int, k: int):
        if k < 1:
            raise ValueError(f"per-class cap must be at least 1, got {k}")
        self.num_classes, self.k = int(num_classes), int(k)
        self.heaps: list[list[int]] = [[] for _ in range(self.num_classes)]

    def push(self, cls: int, conf: float, unit: int, ordinal: int) -> None:
        heap = self.heaps[cls]
        entry = pack(conf, unit, ordinal)
        if len(heap) < self.k:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            heapq.heapreplace(heap, entry)

    def push_many(self, classes: Sequence[int], confs: Sequence[float], units: Sequence[int] | int,
                  ordinals: Sequence[int]) -> None:
        units = [units] * len(classes) if isinstance(units, (int, np.integer)) else units
        for c, p, u, o in zip(classes, confs, units, ordinals):
            self.push(int(c), float(p), int(u), int(o))

    def sizes(self) -> np.ndarray:
        return np.array([len(h) for h in self.heaps], dtype=np.int64)

    def merge(self, other: "ClassTopK") -> None:
        if (other.num_classes, other.k) != (self.num_classes, self.k):
            raise ValueError(f"cannot merge top-K of {other.num_classes} classes x {other.k} into "
                             f"{self.num_classes} x {self.k}")
        for heap, entries in zip(self.heaps, other.heaps):
            for entry in entries:
                if len(heap) < self.k:
                    heapq.heappush(heap, entry)
                elif entry > heap[0]:
                    heapq.heapreplace(heap, entry)

    def ranked(self, cls: int) -> list[tuple[float, int, int]]:
        """(confidence, unit, ordinal) of one class, most confident first."""
        return [unpack(e) for e in sorted(self.heaps[cls], reverse=True)]

    # ---- compact arrays, for checkpoints and for handing to other processes -----------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        entries = [(c, e) for c, heap in enumerate(self.heaps) for e in heap]
        cls = np.fromiter((c for c, _ in entries), np.int32, len(entries))
        packed = [e for _, e in entries]
        return {
            "num_classes": np.int64(self.num_classes), "k": np.int64(self.k), "cls": cls,
            "conf_bits": np.fromiter((e >> 64 for e in packed), np.uint32, len(packed)),
            "unit": np.fromiter(((e >> 32) & _LOW for e in packed), np.uint32, len(packed)),
            "ordinal": np.fromiter((e & _LOW for e in packed), np.uint32, len(packed)),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "ClassTopK":
        top = cls(int(state["num_classes"]), int(state["k"]))
        for c, bits, u, o in zip(state["cls"].tolist(), state["conf_bits"].tolist(), state["unit"].tolist(),
                                 state["ordinal"].tolist()):
            top.heaps[c].append((bits << 64) | (u << 32) | o)
        for heap in top.heaps:
            if len(heap) > top.k:
                raise ValueError(f"a stored heap holds {len(heap)} entries, more than K={top.k}")
            heapq.heapify(heap)
        return top

    @classmethod
    def merged(cls, parts: Iterable["ClassTopK"]) -> "ClassTopK":
        parts = list(parts)
        out = cls(parts[0].num_classes, parts[0].k)
        for part in parts:
            out.merge(part)
        return out
