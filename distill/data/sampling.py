"""Which samples of a sharded source each reader reads, as a pure function of seeds and counts.

A reader is one (process, loader worker) pair; there are `readers = processes x workers` of them. Shards are
cut into chunks of consecutive samples, so that a split never depends on how many shards there are:

- evaluation: the samples in shard order, cut into `readers` contiguous shares of near-equal size;
- training, one pass over a source: chunks (boundaries shifted at random per shard and pass) in a random
  order that every reader computes alike, then cut into `readers` contiguous shares of the same kind.

Either way, each sample belongs to exactly one reader, and shares differ by at most one sample, whatever the
shard count. Everything here is a function of its arguments: a reader can recompute where it stands.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Segment = tuple[int, int, int]  # (shard index, first sample in the shard, number of samples)


def share_bounds(total: int, parts: int, index: int) -> tuple[int, int]:
    """[lo, hi) of part `index` when `total` items are cut into `parts` contiguous near-equal parts."""
    return index * total // parts, (index + 1) * total // parts


def cut(pieces: Sequence[Segment], lo: int, hi: int) -> list[Segment]:
    """The samples at positions [lo, hi) of the concatenation of `pieces`, as pieces."""
    out, pos = [], 0
    for shard, start, length in pieces:
        a, b = max(lo, pos), min(hi, pos + length)
        if a < b:
            out.append((shard, start + a - pos, b - a))
        pos += length
        if pos >= hi:
            break
    return out


def eval_share(sizes: Sequence[int], reader: int, readers: int) -> list[Segment]:
    """This reader's contiguous share of all samples, in shard order."""
    pieces = [(i, 0, n) for i, n in enumerate(sizes) if n > 0]
    return cut(pieces, *share_bounds(sum(sizes), readers, reader))


def pass_share(sizes: Sequence[int], chunk: int, seed: int, epoch: int, reader: int, readers: int) -> list[Segment]:
    """This reader's share of one training pass: chunks of at most `chunk` samples in a random order
    (the same on every reader for a given seed and epoch), concatenated and cut into near-equal shares."""
    rng = np.random.default_rng([seed, epoch])
    pieces: list[Segment] = []
    for shard, n in enumerate(sizes):
        if n <= 0:
            continue
        shift = int(rng.integers(chunk)) % n if n > chunk else 0  # chunk boundaries move from pass to pass
        pieces += [(shard, a, min(chunk, n - a)) for a in range(shift, n, chunk)]
        pieces += [(shard, a, min(chunk, shift - a)) for a in range(0, shift, chunk)]
    order = rng.permutation(len(pieces))
    return cut([pieces[i] for i in order], *share_bounds(sum(sizes), readers, reader))
