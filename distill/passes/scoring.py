"""Curation's first pass: score every pool image with eval preprocessing and keep per-class top-K references.

Workers decode and centre-crop; the main process runs the scorer and folds each finished unit into the
progress, which is checkpointed every `every` units. Images live only as the batch being scored.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.data.augment import create_augment
from distill.data.shards import CorruptSampleError
from distill.engine.preemption import UnitStop
from distill.passes.curation_state import CurationProgress, UnitScores
from distill.passes.scan import Batcher, scan_units
from distill.passes.units import Unit, decode_image, iter_unit

logger = logging.getLogger("distill")


class EvalRender:
    """Worker side: a unit's images, decoded and centre-cropped for the scorer, with their ordinals."""

    def __init__(self, img_size: int, crop_pct: float, batch_size: int):
        self.img_size, self.crop_pct, self.batch_size = img_size, crop_pct, batch_size

    def __call__(self, unit: Unit) -> Iterator[dict]:
        augment = create_augment("eval", self.img_size, crop_pct=self.crop_pct, seed=0)
        batcher = Batcher(self.batch_size)
        for sample in iter_unit(unit):
            try:
                chw = augment(decode_image(sample))
            except CorruptSampleError as e:
                logger.warning("%s (skipped)", e)
                batcher.skip()
                continue
            batch = batcher.add({"image": chw, "ordinal": sample.ordinal})
            if batch:
                yield batch
        yield from batcher.finish()


@torch.no_grad()
def top_class(scorer: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, accelerator) -> tuple[np.ndarray, np.ndarray]:
    """(most probable class, its probability) per image of a uint8 batch."""
    x = images.to(accelerator.device, non_blocking=True).float().div_(255)
    with accelerator.autocast():
        logits = scorer(x)
    conf, cls = logits.float().softmax(dim=-1).max(dim=-1)
    return cls.cpu().numpy().astype(np.int64), conf.cpu().numpy().astype(np.float32)


def score_units(units: Sequence[Unit], render: EvalRender, scorer, progress: CurationProgress, accelerator,
                save_to: Path, every: int, num_workers: int) -> int:
    """Score the units not yet done; returns the number of images scored in this call."""
    todo = [u for u in units if u.index not in progress.done]
    if len(todo) < len(units):
        logger.info("resuming: %d of this process's %d units already scored", len(units) - len(todo), len(units))
    in_flight: dict[int, UnitScores] = {}
    scored, since_save, stop = 0, 0, UnitStop()
    bar = tqdm(total=len(todo), desc=f"score[{accelerator.process_index}]", unit="shard",
               disable=not accelerator.is_local_main_process)
    for batch in scan_units(todo, render, num_workers, pin_memory=torch.cuda.is_available()):
        unit = int(batch["unit"])
        part = in_flight.setdefault(unit, UnitScores())
        part.skipped += int(batch["skipped"])
        if batch["size"]:
            cls, conf = top_class(scorer, batch["image"], accelerator)
            part.cls.append(cls)
            part.conf.append(conf)
            part.ordinal.append(batch["ordinal"].numpy().astype(np.int64))
            scored += len(cls)
        if batch["unit_done"]:
            progress.absorb(unit, in_flight.pop(unit))
            since_save += 1
            bar.update(1)
            if since_save >= every:
                progress.save(save_to)
                since_save = 0
            if stop.requested():  # units scored so far are saved below; the rest wait for a resumed launch
                break
    bar.close()
    progress.save(save_to)
    return scored
