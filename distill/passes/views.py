"""The stored views of offline labelling: what a source's augmentation makes of an image, mixup included,
JPEG-encoded and decoded again (the teacher labels the decoded pixels: exactly what the student will read).

A unit is one (source, shard, replica). Its augmentation stream is seeded from (seed, source, shard,
replica) once, then runs through the shard in order; its mixup draws come from a generator seeded the same
way. Rendering a unit again gives the same views, byte for byte, so any stored view can be replayed.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import cv2
import numpy as np
import torch

from distill.data.augment import create_augment
from distill.data.mixup import mixup_batch
from distill.data.shards import CorruptSampleError, SkipCounter, decode_sample, encode_jpeg, iter_shard

logger = logging.getLogger("distill")


@dataclass(frozen=True)
class ViewUnit:
    index: int  # position in the pass's unit list
    source: str
    shard: str  # the source shard's path
    shard_index: int  # its position in the source
    replica: int

    @property
    def name(self) -> str:
        return f"{self.source}/r{self.replica:04d}/{self.shard_index:06d}"

    @property
    def file_name(self) -> str:
        return f"{self.source}-r{self.replica:04d}-{self.shard_index:06d}.tar"

    def seed(self, base: int) -> list[int]:
        return [base, zlib.crc32(self.source.encode()), self.shard_index, self.replica]


def jpeg_round_trip(image_hwc: np.ndarray, quality: int) -> tuple[bytes, np.ndarray]:
    """(JPEG bytes, the RGB pixels a reader decodes from them)."""
    data = encode_jpeg(image_hwc, quality)
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return data, decoded


class ViewRender:
    """Worker side: a unit's views in batches: {"image" uint8 (B,3,H,W) decoded view, "jpg" [bytes], "label",
    "key", "partner_key", "partner_label", "lam"}."""

    def __init__(self, augments: dict[str, dict], mixup: dict[str, bool], img_size: int, quality: int,
                 batch_size: int, seed: int, labelled: Optional[dict[str, bool]] = None):
        self.augments, self.mixup = augments, mixup
        self.labelled = labelled or {}  # a source named False here has no classes: its views get label -1
        self.img_size, self.quality, self.batch_size, self.seed = img_size, quality, batch_size, seed

    def __call__(self, unit: ViewUnit) -> Iterator[dict]:
        spec = dict(self.augments[unit.source])
        seeds = np.random.SeedSequence(unit.seed(self.seed)).generate_state(2)
        augment = create_augment(spec.pop("name"), self.img_size, seed=int(seeds[0]), **spec)
        mix_gen = torch.Generator().manual_seed(int(seeds[1]))
        skips = SkipCounter()
        views, labels, keys, reported = [], [], [], 0
        for sample in iter_shard(unit.shard, skips):
            try:
                image, label = decode_sample(sample, self.labelled.get(unit.source, True))
            except CorruptSampleError as e:
                skips(e)
                continue
            views.append(augment(image))
            labels.append(label)
            keys.append(str(sample["__key__"]))
            if len(views) == self.batch_size:
                yield self._finish(views, labels, keys, mix_gen, unit, skips.count - reported)
                views, labels, keys, reported = [], [], [], skips.count
        if views or skips.count > reported:
            yield self._finish(views, labels, keys, mix_gen, unit, skips.count - reported)

    def _finish(self, views, labels, keys, mix_gen, unit: ViewUnit, skipped: int) -> dict:
        n = len(views)
        if not n:
            return {"size": 0, "skipped": skipped}
        x = torch.from_numpy(np.stack(views)).float()
        mask = torch.full((n,), self.mixup[unit.source])
        mixed, partner, lam = mixup_batch(x, mask, generator=mix_gen)
        pixels = mixed.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        jpgs, decoded = zip(*(jpeg_round_trip(p, self.quality) for p in pixels))
        partner = partner.tolist()
        return {
            "size": n, "skipped": skipped,
            "image": torch.from_numpy(np.stack(decoded).transpose(0, 3, 1, 2).copy()),
            "jpg": list(jpgs), "label": torch.tensor(labels), "key": keys,
            "partner_key": [keys[p] for p in partner], "partner_label": torch.tensor([labels[p] for p in partner]),
            "lam": lam.float(),
        }
