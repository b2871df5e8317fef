"""DataLoaders: the endless training mix, and a single pass over evaluation shards.

Batches hold uint8 CHW images; convert and normalise them on the device. The training loader is torchdata's
StatefulDataLoader: its `state_dict()` holds every worker's position in the stream, so a resumed run reads on
from exactly where the interrupted one stopped.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset

from distill.data.augment import create_augment
from distill.data.mix import DataMix
from distill.data.sampling import eval_share, share_bounds
from distill.data.shards import SkipCounter, decode_augmented, expand_shards, read_samples, sample_offsets, shard_sizes
from distill.engine.preemption import ignore_stop_signals
from distill.data.stream import MixedStream, reader_of, single_threaded_opencv

logger = logging.getLogger(__name__)


def build_train_loader(mix: DataMix, img_size: int, batch_size: int, num_workers: int, seed: int,
                       total_samples: int, origin: int = 0, rank: int = 0, world_size: int = 1, **stream_kw):
    """Batches {"image" uint8 (B,C,H,W), "label", "source", "skipped"} of the mix, endlessly.
    `stream_kw` goes to MixedStream (with_keys, soft_labels: offline teacher labels as "soft_idx" /
    "soft_prob"). The loader's `state_dict()` / `load_state_dict()` save and restore the data position."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    single_threaded_opencv()
    stream = MixedStream(mix, img_size, seed, total_samples, origin, rank, world_size,
                         num_workers=num_workers, **stream_kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(
            stream, batch_size=batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
            worker_init_fn=ignore_stop_signals,
        )


class EvalStream(IterableDataset):
    """Every sample of the shards exactly once over all (rank, worker) readers, split by samples so that
    every reader gets a near-equal share whatever the shard count. Yields {"image", "label", "skipped"}."""

    def __init__(self, shards: Sequence[str], img_size: int, crop_pct: float, rank: int = 0, world_size: int = 1,
                 with_keys: bool = False):
        super().__init__()
        self.shards, self.with_keys = list(shards), with_keys
        self.sizes = shard_sizes(self.shards)
        self.rank, self.world_size = rank, world_size
        self.augment = create_augment("eval", img_size, crop_pct=crop_pct, seed=0)
        lo, hi = share_bounds(sum(self.sizes), world_size, rank)
        self.share_size = hi - lo  # samples this process evaluates (its workers' shares together)

    def __iter__(self) -> Iterator[dict]:
        reader, readers = reader_of(self.rank, self.world_size)
        skips, reported = SkipCounter(), 0
        for shard, start, length in eval_share(self.sizes, reader, readers):
            path, got, failure = self.shards[shard], 0, None
            try:
                offsets = sample_offsets(path)
                samples = read_samples(path, int(offsets[start]), length) if start < len(offsets) else iter(())
                for sample in samples:
                    got += 1
                    try:
                        chw, label = decode_augmented(sample, self.augment)
                    except Exception as exc:  # counted and reported with the next good sample
                        skips(exc)
                        continue
                    out = {"image": torch.from_numpy(chw), "label": label, "skipped": skips.count - reported}
                    if self.with_keys:
                        out["key"] = sample["__key__"]
                    yield out
                    reported = skips.count
            except OSError as exc:
                failure = exc
            if got < length:  # the rest of this piece is unreadable: every missing sample counts
                skips(failure or OSError(f"{path}: samples {start + got}..{start + length - 1} are missing"))
                skips.count += length - got - 1
        if skips.count > reported:
            logger.warning("evaluation: %d unreadable samples at the end of this reader's share", skips.count - reported)


def build_eval_loader(shards_spec: Union[str, Sequence[str]], root: Union[str, Path], img_size: int,
                      crop_pct: float, batch_size: int, num_workers: int, rank: int = 0,
                      world_size: int = 1, with_keys: bool = False) -> DataLoader:
    """One pass of {"image" uint8 (B,C,H,W), "label", "skipped"} batches of this rank's share of the samples."""
    single_threaded_opencv()
    stream = EvalStream(expand_shards(shards_spec, root), img_size, crop_pct, rank, world_size, with_keys)
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
                      worker_init_fn=ignore_stop_signals)
