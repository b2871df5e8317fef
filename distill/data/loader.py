"""DataLoaders: the endless training mix, and a single pass over evaluation shards.

Batches hold uint8 CHW images; convert and normalise them on the device.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill.data.augment import create_augment
from distill.data.mix import DataMix, MixedStream
from distill.data.shards import SkipCounter, decode_sample, expand_shards, iter_shard

logger = logging.getLogger(__name__)


def build_train_loader(mix: DataMix, img_size: int, batch_size: int, num_workers: int, seed: int,
                       total_samples: int, start_sample: int = 0, rank: int = 0, world_size: int = 1,
                       **stream_kw) -> DataLoader:
    """Batches {"image" uint8 (B,C,H,W), "label", "source", "skipped"} of the mix, endlessly.
    `stream_kw` goes to MixedStream (shuffle_buffer, with_keys, soft_labels: offline teacher labels as
    "soft_idx" / "soft_prob")."""
    stream = MixedStream(mix, img_size, seed, total_samples, start_sample, rank, world_size,
                         num_workers=num_workers, **stream_kw)
    return DataLoader(
        stream, batch_size=batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


class EvalStream(IterableDataset):
    """Every sample of the shards exactly once over all (rank, worker) readers; the split is by shard, so a
    reader may get none. Yields {"image", "label", "skipped"}."""

    def __init__(self, shards: Sequence[str], img_size: int, crop_pct: float, rank: int = 0, world_size: int = 1,
                 with_keys: bool = False):
        super().__init__()
        self.shards, self.with_keys = list(shards), with_keys
        self.rank, self.world_size = rank, world_size
        self.augment = create_augment("eval", img_size, crop_pct=crop_pct, seed=0)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.shards[self.rank :: self.world_size][worker::workers]
        skips, reported = SkipCounter(), 0
        for url in mine:
            for sample in iter_shard(url, skips):
                try:
                    image, label = decode_sample(sample)
                    chw = self.augment(image)
                except Exception as exc:  # counted and reported with the next good sample
                    skips(exc)
                    continue
                out = {"image": torch.from_numpy(chw), "label": label, "skipped": skips.count - reported}
                if self.with_keys:
                    out["key"] = sample["__key__"]
                yield out
                reported = skips.count
        if skips.count > reported:
            logger.warning("evaluation: %d unreadable samples or shards at the end of this reader's shards",
                           skips.count - reported)


def build_eval_loader(shards_spec: Union[str, Sequence[str]], root: Union[str, Path], img_size: int,
                      crop_pct: float, batch_size: int, num_workers: int, rank: int = 0,
                      world_size: int = 1, with_keys: bool = False) -> DataLoader:
    """One pass of {"image" uint8 (B,C,H,W), "label", "skipped"} batches of this rank's share of the shards."""
    stream = EvalStream(expand_shards(shards_spec, root), img_size, crop_pct, rank, world_size, with_keys)
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available())
