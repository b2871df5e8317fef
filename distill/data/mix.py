"""A data mix: named shard sources, each with its augmentation, interleaved per sample by weight.

A mix is a YAML file (`data_mixes/NAME.yaml`, or any path):

    sources:
      d1: {shards: imagenet/train, augment: {name: inception_randaug_tf, magnitude: 9}, weight: 1}
      d2: {shards: imagenet/train, augment: {name: inception}, mixup: true, weight: 1}
    schedule:          # optional: weights piecewise-linear in training progress (0 = start, 1 = end)
      - {at: 0.0, weights: {d1: 3, d2: 1}}
      - {at: 1.0, weights: {d1: 1, d2: 1}}

Shard paths resolve against the data root. With a schedule, the sources' own `weight`s are not used.
A source of images without classes says `labelled: false`: its samples need no `cls` entry and carry label -1
(a run that trains on labels refuses it at start, see `distill.data.labels`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import yaml

from distill.config import packaged_dir
from distill.data.augment import check_augment, create_augment
from distill.data.shards import expand_shards, read_manifest
from distill.errors import MixError

logger = logging.getLogger(__name__)

MIX_DIR = packaged_dir("data_mixes")

_MIX_KEYS = {"sources", "schedule", "description"}
_SOURCE_KEYS = {"shards", "augment", "weight", "mixup", "labelled"}
_POINT_KEYS = {"at", "weights"}


@dataclass
class Source:
    name: str
    shards: Union[str, list[str]]
    augment: dict[str, Any]  # {"name": preset, **params}
    weight: float = 1.0
    mixup: bool = False
    labelled: bool = True  # false: images without classes, each sample's label is UNLABELLED


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
            labelled = spec.get("labelled", True)
            if not isinstance(labelled, bool):
                fail(f"{key}.labelled", f"expected true or false, got {labelled!r}")
            sources.append(Source(str(name), shards, dict(augment), weight, mixup, labelled))

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

    @property
    def unlabelled_sources(self) -> list[str]:
        return [s.name for s in self.sources if not s.labelled]

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
        raise MixError(
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
