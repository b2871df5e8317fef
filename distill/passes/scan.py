"""The loop both passes share: batches prepared by DataLoader workers, one unit at a time per worker.

A pass supplies `render(unit) -> Iterator[dict]`, the CPU work on one unit (decode, preprocess, augment),
run inside the workers. Each batch comes back tagged with its unit, and the unit's last batch says so: the
main process then knows the unit is complete and may record it (a checkpoint, a finished file). Batches of
one worker arrive in order, so "last batch seen" means "every sample of the unit seen".
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill.engine.preemption import ignore_stop_signals
from distill.passes.units import Unit

Render = Callable[[Unit], Iterator[dict]]


class UnitBatches(IterableDataset):
    def __init__(self, units: Sequence[Unit], render: Render):
        self.units, self.render = list(units), render

    def __iter__(self):
        info = get_worker_info()
        mine = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in mine:
            pending: Optional[dict] = None
            for batch in self.render(unit):
                if pending is not None:
                    yield {**pending, "unit": unit.index, "unit_done": False}
                pending = batch
            yield {**(pending or {"size": 0, "skipped": 0}), "unit": unit.index, "unit_done": True}


def scan_units(units: Sequence[Unit], render: Render, num_workers: int, pin_memory: bool = False) -> Iterator[dict]:
    """Batches of every unit in `units`; `num_workers=0` renders in this process (tests, debugging)."""
    if not units:
        return iter(())
    loader = DataLoader(
        UnitBatches(units, render), batch_size=None, num_workers=min(num_workers, len(units)),
        pin_memory=pin_memory, persistent_workers=False, worker_init_fn=ignore_stop_signals,
    )
    return iter(loader)


class Batcher:
    """Groups per-sample results into batches of `batch_size` for a render function: stacks arrays, keeps
    lists, counts skipped samples, and always produces at least one batch (possibly empty) per unit."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.items: list[dict] = []
        self.skipped = 0

    def skip(self) -> None:
        self.skipped += 1

    def add(self, item: dict) -> Optional[dict]:
        self.items.append(item)
        return self.flush() if len(self.items) >= self.batch_size else None

    def flush(self) -> dict:
        items, self.items = self.items, []
        batch = {"size": len(items), "skipped": self.skipped}
        self.skipped = 0
        for name in (items[0] if items else {}):
            values = [it[name] for it in items]
            if isinstance(values[0], np.ndarray):
                batch[name] = torch.from_numpy(np.stack(values))
            elif isinstance(values[0], (int, float, np.integer, np.floating)):
                batch[name] = torch.tensor(np.asarray(values))
            else:
                batch[name] = values
        return batch

    def finish(self) -> Iterator[dict]:
        """The last, partial batch; an empty one when the unit had nothing left (so skips are counted)."""
        if self.items or self.skipped:
            yield self.flush()
