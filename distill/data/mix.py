"""A data mix: named shard sources, each with its augmentation, interleaved per sample by weight.

A mix is a YAML file (`data_mixes/NAME.yaml`, or any path):

    sources:
      d1: {shards: "imagenet/train-{000000..001023}.tar", augment: {name: inception_randaug, magnitude: 9}, weight: 1}
      d2: {shards: imagenet/train, augment: {name: inception}, mixup: true, weight: 1}
    schedule:          # optional: weights piecewise-linear in training progress (0 = start, 1 = end)
      - {at: 0.0, weights: {d1: 3, d2: 1}}
      - {at: 1.0, weights: {d1: 1, d2: 1}}

Shard paths resolve against the data root. With a schedule, the sources' own `weight`s are not used.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
import yaml
from torch.utils.data import IterableDataset, get_worker_info

from distill.data.augment import check_augment, create_augment
from distill.data.shards import (
    SkipCounter,
    decode_sample,
    decode_soft_labels,
    expand_shards,
    iter_shard,
    read_manifest,
)

logger = logging.getLogger(__name__)

MIX_DIR = Path(__file__).resolve().parents[2] / "data_mixes"

_MIX_KEYS = {"sources", "schedule", "description"}
_SOURCE_KEYS = {"shards", "augment", "weight", "mixup"}
_POINT_KEYS = {"at", "weights"}


class MixError(ValueError):
    """A data mix file that does not describe a valid mix; the message names the file and key."""


@dataclass
class Source:
    name: str
    shards: Union[str, list[str]]
    augment: dict[str, Any]  # {"name": preset, **params}
    weight: float = 1.0
    mixup: bool = False


@dataclass
class DataMix:
    sources: list[Source]
    root: Path
    schedule: Optional[list[tuple[float, np.ndarray]]] = None  # (at, weights in source order)
    path: Optional[Path] = None
    _shard_cache: dict[str, list[str]] = field(default_factory=dict, repr=False)

    # ---- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, name_or_path: Union[str, Path], root: Union[str, Path]) -> "DataMix":
        """`name_or_path`: a mix name (data_mixes/NAME.yaml) or a path to a YAML file."""
        text = str(name_or_path)
        path = Path(text)
        if not (text.endswith((".yaml", ".yml")) or path.is_file()):
            path = MIX_DIR / f"{text}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in MIX_DIR.glob("*.yaml"))
            raise MixError(f"data mix {text!r}: no file {path}; known mixes in {MIX_DIR}: {known}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise MixError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_dict(data, root, path)

    @classmethod
    def from_dict(cls, data: Any, root: Union[str, Path], path: Optional[Path] = None) -> "DataMix":
        where = str(path or "<data mix>")

        def fail(key: str, msg: str):
            raise MixError(f"{where}: {key}: {msg}")

        if not isinstance(data, dict):
            fail("(top level)", f"expected a mapping with keys {sorted(_MIX_KEYS)}, got {type(data).__name__}")
        _check_keys(data, _MIX_KEYS, "(top level)", fail)
        raw_sources = data.get("sources")
        if not isinstance(raw_sources, dict) or not raw_sources:
            fail("sources", "expected a non-empty mapping of source name -> {shards, augment, weight, mixup}")

        sources = []
        for name, spec in raw_sources.items():
            key = f"sources.{name}"
            if not isinstance(spec, dict):
                fail(key, f"expected a mapping with keys {sorted(_SOURCE_KEYS)}")
            _check_keys(spec, _SOURCE_KEYS, key, fail)
            shards = spec.get("shards")
            if not (isinstance(shards, str) and shards) and not (
                isinstance(shards, list) and shards and all(isinstance(s, str) for s in shards)
            ):
                fail(f"{key}.shards", f"expected a path / brace pattern or a list of them, got {shards!r}")
            augment = spec.get("augment")
            if isinstance(augment, str):
                augment = {"name": augment}
            if not isinstance(augment, dict) or not isinstance(augment.get("name"), str):
                fail(f"{key}.augment", f"expected {{name: PRESET, ...params}}, got {augment!r}")
            params = {k: v for k, v in augment.items() if k != "name"}
            try:
                check_augment(augment["name"], params)
                create_augment(augment["name"], 32, **params)  # bad values fail here, not in a loader worker
            except (ValueError, TypeError) as exc:
                fail(f"{key}.augment", str(exc))
            weight = _number(spec.get("weight", 1.0), f"{key}.weight", fail)
            mixup = spec.get("mixup", False)
            if not isinstance(mixup, bool):
                fail(f"{key}.mixup", f"expected true or false, got {mixup!r}")
            sources.append(Source(str(name), shards, dict(augment), weight, mixup))

        names = [s.name for s in sources]
        schedule = None
        if data.get("schedule") is not None:
            schedule = _parse_schedule(data["schedule"], names, fail)
        elif sum(s.weight for s in sources) <= 0:
            fail("sources.*.weight", "all weights are zero; at least one source must have a positive weight")
        return cls(sources, Path(root), schedule, path)

    # ---- queries -----------------------------------------------------------------------------------

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def mixup_flags(self) -> list[bool]:
        return [s.mixup for s in self.sources]

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"data mix {self.path}: no source {name!r}; sources: {self.source_names}")

    def weights_at(self, progress: Union[float, np.ndarray]) -> np.ndarray:
        """Normalised source weights at training progress in [0, 1] (clamped): shape (S,), or (N, S) for an
        array of N progress values."""
        p = np.clip(np.asarray(progress, dtype=np.float64), 0.0, 1.0)
        if self.schedule is None:
            w = np.array([s.weight for s in self.sources], dtype=np.float64)
            w = np.broadcast_to(w, p.shape + w.shape)
        else:
            ats = np.array([a for a, _ in self.schedule])
            table = np.stack([w for _, w in self.schedule])  # (points, S)
            w = np.stack([np.interp(p, ats, table[:, j]) for j in range(table.shape[1])], axis=-1)
        return w / w.sum(axis=-1, keepdims=True)

    def shard_paths(self, name: str) -> list[str]:
        """The source's shard files (checked to exist; FileNotFoundError names the source and missing files)."""
        if name not in self._shard_cache:
            try:
                self._shard_cache[name] = expand_shards(self.source(name).shards, self.root)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"data mix {self.path}, source {name!r}: {exc}") from None
        return self._shard_cache[name]

    def num_samples(self, name: str, default: Optional[int] = None) -> int:
        """Samples in one pass over the source, from the manifests next to its shards. Without manifests,
        `default` if given, else ValueError."""
        manifest = read_manifest(self.shard_paths(name))
        if manifest is not None:
            return int(manifest["num_samples"])
        if default is not None:
            return default
        raise ValueError(
            f"data mix {self.path}, source {name!r}: its size is unknown (no manifest.json lists all of its "
            f"shards); write one (scripts/folder_to_shards.py does) or give the epoch size explicitly"
        )


def _check_keys(mapping: dict, valid: set, key: str, fail) -> None:
    unknown = sorted(set(map(str, mapping)) - valid)
    if unknown:
        fail(key, f"unknown keys {unknown}; valid keys: {sorted(valid)}")


def _number(value: Any, key: str, fail) -> float:
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        fail(key, f"expected a finite number, got {str(value)[:40]}")
    if value < 0:
        fail(key, f"weights must be >= 0, got {value}")
    return float(value)


def _parse_schedule(raw: Any, names: list[str], fail) -> list[tuple[float, np.ndarray]]:
    if not isinstance(raw, list) or not raw:
        fail("schedule", "expected a non-empty list of {at, weights}")
    points = []
    for i, point in enumerate(raw):
        key = f"schedule[{i}]"
        if not isinstance(point, dict):
            fail(key, f"expected a mapping with keys {sorted(_POINT_KEYS)}, got {point!r}")
        _check_keys(point, _POINT_KEYS, key, fail)
        at = point.get("at")
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not 0 <= at <= 1:
            fail(f"{key}.at", f"expected a training progress in [0, 1], got {at!r}")
        if points and at <= points[-1][0]:
            fail(f"{key}.at", f"`at` must increase strictly along the schedule; {at} follows {points[-1][0]}")
        weights = point.get("weights")
        if not isinstance(weights, dict):
            fail(f"{key}.weights", f"expected a mapping source -> weight for the sources {names}")
        unknown = sorted(set(map(str, weights)) - set(names))
        if unknown:
            fail(f"{key}.weights", f"unknown sources {unknown}; the mix's sources: {names}")
        missing = [n for n in names if n not in weights]
        if missing:
            fail(f"{key}.weights", f"no weight for sources {missing}; every point names every source")
        w = np.array([_number(weights[n], f"{key}.weights.{n}", fail) for n in names])
        if w.sum() <= 0:
            fail(f"{key}.weights", "all weights are zero; at least one source must have a positive weight")
        points.append((float(at), w))
    return points


# --------------------------------------------------------------------------------------------------
# The training stream
# --------------------------------------------------------------------------------------------------


class MixedStream(IterableDataset):
    """An endless stream of augmented samples, each drawn from a source with the mix's weights at the
    current training progress. Yields {"image": CHW uint8 tensor, "label", "source", "skipped"}.

    Each source's shards are split over (rank, worker) per pass, after a seeded shuffle that every worker
    repeats identically, so no sample is seen twice in one pass over a source. The sample index, hence the
    progress, follows from (start_sample, rank, worker, local count) alone: no communication, and a resumed
    run continues the schedule at `start_sample`.

    Corrupt samples and unreadable shards are skipped; "skipped" counts those met since the previous yielded
    sample of this worker, so summing it over batches counts them all. `shuffle_buffer` mixes samples across
    shard boundaries (raw bytes, per source; 0 keeps shard order); `with_keys` adds each sample's "key";
    `soft_labels` adds the stored offline teacher labels "soft_idx" (int64 (k,)), "soft_prob" (float32 (k,)),
    "partner_label" and "lam" (`decode_soft_labels`), and a sample without them counts as corrupt.
    """

    MAX_CONSECUTIVE_FAILURES = 1000  # a source this broken is an error, not a few bad samples

    def __init__(self, mix: DataMix, img_size: int, seed: int, total_samples: int, start_sample: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: Optional[int] = None,
                 shuffle_buffer: int = 256, block: int = 1024, with_keys: bool = False, soft_labels: bool = False):
        super().__init__()
        if total_samples <= 0:
            raise ValueError(f"total_samples must be positive, got {total_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.mix, self.img_size, self.seed = mix, img_size, int(seed)
        self.total_samples, self.start_sample = int(total_samples), int(start_sample)
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.block, self.with_keys = shuffle_buffer, block, with_keys
        self.soft_labels = soft_labels
        self.shards = [mix.shard_paths(n) for n in mix.source_names]  # resolve now: errors surface early
        if num_workers is not None:
            self._check_split(max(1, num_workers))

    def _check_split(self, num_workers: int) -> None:
        readers = self.world_size * num_workers
        for name, shards in zip(self.mix.source_names, self.shards):
            if len(shards) < readers:
                raise ValueError(
                    f"data mix {self.mix.path}, source {name!r}: {len(shards)} shards cannot be split over "
                    f"{self.world_size} processes x {num_workers} loader workers = {readers} readers; "
                    f"write the source as at least {readers} shards or use fewer workers"
                )

    def _raw(self, s: int, reader: int, readers: int, rng: np.random.Generator, skips: SkipCounter) -> Iterator[dict]:
        """Raw samples of source `s` for this reader, pass after pass, through a small shuffle buffer."""
        shards, buffer = self.shards[s], []
        for epoch in itertools.count():
            # The same permutation on every reader: their slices partition the pass.
            order = np.random.default_rng([self.seed, s, self.start_sample, epoch]).permutation(len(shards))
            seen = 0
            for i in order[reader::readers]:
                for sample in iter_shard(shards[i], skips):
                    seen += 1
                    if self.shuffle_buffer <= 0:
                        yield sample
                        continue
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(sample)
                        continue
                    j = int(rng.integers(len(buffer)))
                    buffer[j], sample = sample, buffer[j]
                    yield sample
            if seen == 0:
                raise RuntimeError(f"data mix {self.mix.path}, source {self.mix.source_names[s]!r}: a whole pass "
                                   f"over this reader's shards gave no samples (all missing or unreadable)")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._check_split(workers)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        rng = np.random.default_rng([self.seed, reader, self.start_sample])
        skips = SkipCounter()
        augments = []
        for s, src in enumerate(self.mix.sources):
            params = {k: v for k, v in src.augment.items() if k != "name"}
            augments.append(create_augment(src.augment["name"], self.img_size,
                                           seed=int(rng.integers(2**31)), **params))
        raws = [self._raw(s, reader, readers, rng, skips) for s in range(len(self.mix.sources))]

        local, reported = 0, 0
        while True:
            # Draw the sources of the next block of samples at once, each at its own progress.
            index = self.start_sample + (local + np.arange(self.block)) * readers + reader
            cum = np.cumsum(self.mix.weights_at(index / self.total_samples), axis=1)
            choice = (rng.random((self.block, 1)) * cum[:, -1:] >= cum).sum(axis=1)
            for s in choice.tolist():
                s = min(s, len(raws) - 1)
                for _ in range(self.MAX_CONSECUTIVE_FAILURES):
                    sample = next(raws[s])
                    try:
                        image, label = decode_sample(sample)
                        soft = decode_soft_labels(sample) if self.soft_labels else None
                        chw = augments[s](image)
                        break
                    except Exception as exc:  # one bad sample never ends a run; it is counted instead
                        skips(exc)
                else:
                    raise RuntimeError(f"data mix {self.mix.path}, source {self.mix.source_names[s]!r}: "
                                       f"{self.MAX_CONSECUTIVE_FAILURES} consecutive samples failed to decode")
                out = {"image": torch.from_numpy(chw), "label": label, "source": s, "skipped": skips.count - reported}
                if soft is not None:
                    out.update(soft)
                if self.with_keys:
                    out["key"] = sample["__key__"]
                yield out
                reported = skips.count
                local += 1
