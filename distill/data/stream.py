"""The training stream: samples drawn from the mix's sources by weight, read from shards, augmented.

Every random choice is a function of the seed and of a counter (which sample of which reader), so a reader's
position is a small dict of counters: `MixedStream.state_dict()` gives it, `load_state_dict()` continues from
it exactly, and a `torchdata` StatefulDataLoader carries it for every loader worker (see `loader.py`).

What a pass guarantees: for each source, pass p serves every one of its samples exactly once, counted over all
readers, and the readers' shares of a pass differ by at most one sample (see `sampling.py`). Readers move
through their shares at their own pace, so near the end of a pass one reader may already be in the next.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from distill.data.augment import create_augment
from distill.data.mix import DataMix, MixError
from distill.data.sampling import pass_share
from distill.engine.rng import mix_seed
from distill.data.shards import (
    SkipCounter,
    decode_augmented,
    decode_soft_labels,
    read_samples,
    sample_offsets,
    shard_sizes,
)

logger = logging.getLogger(__name__)


def reader_of(rank: int, world_size: int) -> tuple[int, int]:
    """(this reader's index, the number of readers) for the calling loader worker (or the main process)."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


def single_threaded_opencv() -> None:
    """One OpenCV thread per process: loader workers are a process per core already, and OpenCV ignores
    OMP_NUM_THREADS (64 workers x every core on a cluster node otherwise). Called in the process that builds
    the loaders, before its workers fork: a forked worker that changes an inherited OpenCV thread pool can
    deadlock on the pool's lock."""
    cv2.setNumThreads(1)


class ShardOffsets:
    """Sample offsets of shards, read once per shard and kept (about 8 bytes a sample)."""

    def __init__(self):
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, path: str) -> np.ndarray:
        if path not in self._cache:
            self._cache[path] = sample_offsets(path)
        return self._cache[path]


class ShardCursor:
    """One reader's way through one source, pass after pass.

    Its share of a pass is a list of pieces (runs of consecutive samples of a shard); `open_pieces` of them are
    read at a time, each whole, and served in a random order, the next sample coming from a random open piece.
    That mixes samples from `open_pieces` places of the source, reading each place sequentially. The position
    is `state` (plain integers); the pieces in memory are re-read from it after a restart.
    """

    def __init__(self, shards: Sequence[str], sizes: Sequence[int], seed: int, reader: int, readers: int,
                 offsets: ShardOffsets, on_error: Callable[[Exception], object], chunk: int = 32,
                 open_pieces: int = 8):
        self.shards, self.sizes, self.seed = list(shards), list(sizes), seed
        self.reader, self.readers, self.chunk, self.open_pieces = reader, readers, chunk, open_pieces
        self.offsets, self.on_error = offsets, on_error
        self.state = {"epoch": 0, "next": 0, "open": [], "draws": 0}  # open: [[piece, served], ...]
        self._share: tuple[int, list] = (-1, [])
        self._loaded: dict[int, tuple[list, np.ndarray]] = {}
        self._uniforms: tuple[tuple[int, int], np.ndarray] = ((-1, -1), np.empty(0))

    def load_state(self, state: dict) -> None:
        self.state = {"epoch": int(state["epoch"]), "next": int(state["next"]),
                      "open": [[int(p), int(n)] for p, n in state["open"]], "draws": int(state["draws"])}
        self._loaded.clear()

    def _pieces(self, epoch: int) -> list:
        if self._share[0] != epoch:
            self._share = (epoch, pass_share(self.sizes, self.chunk, self.seed, epoch, self.reader, self.readers))
        return self._share[1]

    def _uniform(self, epoch: int, draw: int) -> float:
        block = (epoch, draw // 256)
        if self._uniforms[0] != block:
            self._uniforms = (block, np.random.default_rng([self.seed, epoch, self.reader, draw // 256]).random(256))
        return float(self._uniforms[1][draw % 256])

    def _load(self, epoch: int, piece: int) -> tuple[list, np.ndarray]:
        if piece not in self._loaded:
            shard, start, length = self._pieces(epoch)[piece]
            path, samples = self.shards[shard], []
            try:
                offsets = self.offsets(path)
                if start < len(offsets):
                    for sample in read_samples(path, int(offsets[start]), length):
                        samples.append(sample)
                if len(samples) < length:
                    raise OSError(f"{path}: samples {start + len(samples)}..{start + length - 1} are missing or unreadable")
            except OSError as exc:
                self.on_error(exc)
            samples += [None] * (length - len(samples))
            order = np.random.default_rng([self.seed, epoch, self.reader, piece, 1]).permutation(length)
            self._loaded[piece] = (samples, order)
        return self._loaded[piece]

    def next(self) -> Optional[dict]:
        """The next raw sample, or None where it could not be read (reported through `on_error`)."""
        st = self.state
        while True:
            pieces = self._pieces(st["epoch"])
            while len(st["open"]) < self.open_pieces and st["next"] < len(pieces):
                st["open"].append([st["next"], 0])
                st["next"] += 1
            if st["open"]:
                break
            self._loaded.clear()
            st.update(epoch=st["epoch"] + 1, next=0, draws=0)
        slot = st["open"][int(self._uniform(st["epoch"], st["draws"]) * len(st["open"]))]
        st["draws"] += 1
        piece, served = slot
        samples, order = self._load(st["epoch"], piece)
        slot[1] += 1
        if slot[1] == len(order):
            st["open"].remove(slot)
            del self._loaded[piece]
        return samples[order[served]]


class MixedStream(IterableDataset):
    """An endless stream of augmented samples, each drawn from a source with the mix's weights at the current
    training progress. Yields {"image": CHW uint8 tensor, "label", "source", "skipped"}.

    Sample i of reader r has the global index `origin + i * readers + r`, which places it on the mix's
    schedule (out of `total_samples`). Corrupt samples and unreadable shards are skipped; "skipped" counts
    those met since the previous yielded sample of this reader, so summing it over batches counts them all.
    `with_keys` adds each sample's "key"; `soft_labels` adds the stored offline teacher labels "soft_idx"
    (int64 (k,)), "soft_prob" (float32 (k,)), "partner_label" and "lam" (`decode_soft_labels`), and a sample
    without them counts as corrupt.
    `origin` also enters the seed: a run that restarts without its loader state (another process or worker
    count) gets a fresh order from there rather than a repeat of the first samples.
    """

    MAX_CONSECUTIVE_FAILURES = 1000  # a source this broken is an error, not a few bad samples

    def __init__(self, mix: DataMix, img_size: int, seed: int, total_samples: int, origin: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: Optional[int] = None, chunk: int = 32,
                 open_pieces: int = 8, with_keys: bool = False, soft_labels: bool = False):
        super().__init__()
        if total_samples <= 0:
            raise ValueError(f"total_samples must be positive, got {total_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.mix, self.img_size, self.seed = mix, img_size, int(seed)
        self.total_samples, self.origin = int(total_samples), int(origin)
        self.rank, self.world_size = rank, world_size
        self.chunk, self.open_pieces, self.with_keys, self.soft_labels = chunk, open_pieces, with_keys, soft_labels
        self.shards = [mix.shard_paths(n) for n in mix.source_names]  # resolve now: errors surface early
        self.sizes = [shard_sizes(paths) for paths in self.shards]
        self._resume: Optional[dict] = None
        self._state: Optional[dict] = None
        if num_workers is not None:
            self._check_split(max(1, num_workers))

    def _check_split(self, num_workers: int) -> None:
        readers = self.world_size * num_workers
        for name, sizes in zip(self.mix.source_names, self.sizes):
            if sum(sizes) < readers:
                raise MixError(
                    f"data mix {self.mix.path}, source {name!r}: {sum(sizes)} samples cannot be shared by "
                    f"{self.world_size} processes x {num_workers} loader workers = {readers} readers; "
                    f"use fewer loader workers (data.num_workers)"
                )

    # ---- position -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This reader's position: plain integers and lists (saved in run checkpoints)."""
        if self._state is None:
            return self._resume or {}
        st = self._state
        return {**{k: st[k] for k in ("reader", "readers", "origin", "local", "skipped", "reported")},
                "cursors": [dict(c.state, open=[list(o) for o in c.state["open"]]) for c in st["cursors"]]}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state or None

    # ---- the stream ---------------------------------------------------------------------------------

    def _source_choices(self, seed: int, reader: int, readers: int, origin: int, block: int, size: int = 1024):
        index = origin + (block * size + np.arange(size)) * readers + reader
        cum = np.cumsum(self.mix.weights_at(index / self.total_samples), axis=1)
        u = np.random.default_rng([seed, reader, block, 2]).random((size, 1))
        return np.minimum((u * cum[:, -1:] >= cum).sum(axis=1), len(self.sizes) - 1)

    def __iter__(self) -> Iterator[dict]:
        reader, readers = reader_of(self.rank, self.world_size)
        self._check_split(readers // self.world_size)
        resume, self._resume = self._resume, None
        if resume and (resume["reader"], resume["readers"]) != (reader, readers):
            raise ValueError(f"a data position saved by reader {resume['reader']} of {resume['readers']} cannot "
                             f"continue as reader {reader} of {readers}")
        origin = int(resume["origin"]) if resume else self.origin
        seed = mix_seed(self.seed, origin)
        skips = SkipCounter()
        offsets = ShardOffsets()
        cursors = [ShardCursor(self.shards[s], self.sizes[s], mix_seed(seed, s), reader, readers, offsets, skips,
                               self.chunk, self.open_pieces) for s in range(len(self.sizes))]
        augments = [create_augment(src.augment["name"], self.img_size, seed=0,
                                   **{k: v for k, v in src.augment.items() if k != "name"})
                    for src in self.mix.sources]
        labelled = [src.labelled for src in self.mix.sources]
        st = {"reader": reader, "readers": readers, "origin": origin, "local": 0, "skipped": 0, "reported": 0,
              "cursors": cursors}
        if resume:
            st.update({k: int(resume[k]) for k in ("local", "skipped", "reported")})
            for cursor, saved in zip(cursors, resume["cursors"]):
                cursor.load_state(saved)
        self._state = st
        choices = (-1, np.empty(0, dtype=np.int64))

        while True:
            i = st["local"]
            if choices[0] != i // 1024:
                choices = (i // 1024, self._source_choices(seed, reader, readers, origin, i // 1024))
            s = int(choices[1][i % 1024])
            for attempt in range(self.MAX_CONSECUTIVE_FAILURES):
                sample = cursors[s].next()
                if sample is None:  # unreadable; reported by the cursor
                    st["skipped"] += 1
                    continue
                try:
                    soft = decode_soft_labels(sample) if self.soft_labels else None
                    augments[s].reseed(mix_seed(seed, reader, i, attempt))
                    chw, label = decode_augmented(sample, augments[s], labelled[s])  # decodes only what the crop needs
                    break
                except Exception as exc:  # one bad sample never ends a run; it is counted instead
                    skips(exc)
                    st["skipped"] += 1
            else:
                raise RuntimeError(f"data mix {self.mix.path}, source {self.mix.source_names[s]!r}: "
                                   f"{self.MAX_CONSECUTIVE_FAILURES} consecutive samples failed to decode")
            out = {"image": torch.from_numpy(chw), "label": label, "source": s,
                   "skipped": st["skipped"] - st["reported"]}
            if soft is not None:
                out.update(soft)
            if self.with_keys:
                out["key"] = sample["__key__"]
            st["reported"], st["local"] = st["skipped"], i + 1  # the position after this sample, before it leaves
            yield out
