"""What curation knows after scoring some units, per process, and its checkpoint file.

It only ever holds the contributions of *finished* units: a unit's scores are collected aside while it is
being scored and folded in when its last batch is in. A checkpoint is therefore exact, and a resumed run
skips finished units without counting anything twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import torch

from distill.config import ConfigError
from distill.engine.checkpoint import atomic_save, load_checkpoint
from distill.passes.topk import ClassTopK


@dataclass
class ScoreStats:
    """Per class c: images whose most probable class is c (`top1`), those above the threshold
    (`candidates`), and a histogram of their top-class probability (`hist`, `bins` equal bins on [0, 1])."""

    num_classes: int
    bins: int
    top1: np.ndarray = None
    candidates: np.ndarray = None
    hist: np.ndarray = None
    scored: int = 0
    skipped: int = 0

    def __post_init__(self):
        if self.top1 is None:
            self.top1 = np.zeros(self.num_classes, np.int64)
            self.candidates = np.zeros(self.num_classes, np.int64)
            self.hist = np.zeros((self.num_classes, self.bins), np.int64)

    def add(self, cls: np.ndarray, conf: np.ndarray, threshold: float) -> None:
        self.scored += len(cls)
        self.top1 += np.bincount(cls, minlength=self.num_classes)
        self.candidates += np.bincount(cls[conf > threshold], minlength=self.num_classes)
        bin_index = np.minimum((conf * self.bins).astype(np.int64), self.bins - 1)
        np.add.at(self.hist, (cls, bin_index), 1)

    def merge(self, other: "ScoreStats") -> None:
        self.top1 += other.top1
        self.candidates += other.candidates
        self.hist += other.hist
        self.scored += other.scored
        self.skipped += other.skipped

    def state_dict(self) -> dict:
        return {"num_classes": self.num_classes, "bins": self.bins, "top1": self.top1,
                "candidates": self.candidates, "hist": self.hist, "scored": self.scored, "skipped": self.skipped}

    @classmethod
    def from_state_dict(cls, s: dict) -> "ScoreStats":
        return cls(s["num_classes"], s["bins"], s["top1"], s["candidates"], s["hist"], s["scored"], s["skipped"])


@dataclass
class UnitScores:
    """The scores of one unit in flight (references and confidences only, never images)."""

    cls: list = field(default_factory=list)
    conf: list = field(default_factory=list)
    ordinal: list = field(default_factory=list)
    skipped: int = 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.cls:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
        return np.concatenate(self.cls), np.concatenate(self.conf), np.concatenate(self.ordinal)


@dataclass
class CurationProgress:
    fingerprint: str
    top: ClassTopK
    stats: ScoreStats
    threshold: float
    done: set[int] = field(default_factory=set)

    def absorb(self, unit: int, scores: UnitScores) -> None:
        cls, conf, ordinal = scores.arrays()
        self.stats.add(cls, conf, self.threshold)
        self.stats.skipped += scores.skipped
        keep = conf > self.threshold
        self.top.push_many(cls[keep], conf[keep], unit, ordinal[keep])
        self.done.add(unit)

    def save(self, path: Path) -> None:
        atomic_save(_as_tensors({"fingerprint": self.fingerprint, "threshold": self.threshold,
                                 "done": sorted(self.done), "top": self.top.state_dict(),
                                 "stats": self.stats.state_dict()}), path)

    @classmethod
    def load(cls, path: Path) -> "CurationProgress":
        s = _as_arrays(load_checkpoint(path))
        return cls(s["fingerprint"], ClassTopK.from_state_dict(s["top"]), ScoreStats.from_state_dict(s["stats"]),
                   s["threshold"], set(s["done"]))


def _as_tensors(obj):
    """numpy arrays and scalars as tensors and Python numbers: the file then loads with weights_only=True."""
    if isinstance(obj, dict):
        return {k: _as_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_tensors(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    return obj.item() if isinstance(obj, np.generic) else obj


def _as_arrays(obj):
    if isinstance(obj, dict):
        return {k: _as_arrays(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_arrays(v) for v in obj)
    return obj.numpy() if isinstance(obj, torch.Tensor) else obj


def progress_path(folder: Path, rank: int, world: int) -> Path:
    return Path(folder) / ".progress" / f"score-rank{rank:03d}-of-{world:03d}.pt"


def resume_or_start(folder: Path, rank: int, world: int, digest: str, num_classes: int, k: int, bins: int,
                    threshold: float) -> tuple[CurationProgress, bool]:
    """This process's saved progress, or a fresh one. Progress saved by a different number of processes or
    for different scoring settings is refused with a message saying what to do."""
    mine = progress_path(folder, rank, world)
    others = sorted(p.name for p in mine.parent.glob("score-rank*.pt") if not p.name.endswith(f"-of-{world:03d}.pt"))
    if others:
        raise ConfigError(f"{mine.parent} holds progress of a run with another number of processes ({others[0]}); "
                          f"resume with that number, or delete {mine.parent} to score again")
    if mine.exists():
        progress = CurationProgress.load(mine)
        if progress.fingerprint != digest:
            raise ConfigError(f"{mine} was saved for other scoring settings (pool, scorer, threshold, K); "
                              f"use another output_dir, or delete {mine.parent} to score again")
        return progress, True
    return CurationProgress(digest, ClassTopK(num_classes, k), ScoreStats(num_classes, bins), threshold), False


def load_all(folder: Path, world: int) -> list[CurationProgress]:
    return [CurationProgress.load(progress_path(folder, r, world)) for r in range(world)]


def merged(parts: list[CurationProgress]) -> tuple[ClassTopK, ScoreStats, set[int]]:
    top = ClassTopK.merged(p.top for p in parts)
    stats = ScoreStats(parts[0].stats.num_classes, parts[0].stats.bins)
    done: set[int] = set()
    for p in parts:
        stats.merge(p.stats)
        done |= p.done
    return top, stats, done
