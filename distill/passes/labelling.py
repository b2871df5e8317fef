"""Offline labelling's loop: the teacher's top-k distribution for every stored view, written unit by unit."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from distill.engine.preemption import UnitStop
from distill.passes.scan import scan_units
from distill.passes.soft_labels import encode_views
from distill.passes.view_writer import LabelRecords, UnitFile
from distill.passes.views import ViewRender, ViewUnit

logger = logging.getLogger("distill")


@torch.no_grad()
def teacher_probs(teacher, images: torch.Tensor, accelerator) -> torch.Tensor:
    """The teacher's softmax on a batch of decoded views (uint8, (B, 3, H, W))."""
    x = images.to(accelerator.device, non_blocking=True).float().div_(255)
    with accelerator.autocast():
        logits = teacher(x)
    return logits.float().softmax(dim=-1)


def label_units(units: Sequence[ViewUnit], render: ViewRender, teacher, accelerator, out_dir: Path,
                records: LabelRecords, topk: int, num_classes: int, num_workers: int, meta: bool = False,
                targets: str = "full") -> dict:
    """Write every unit in `units`, each view with the teacher's full distribution or its `topk` (`targets`);
    returns {"views", "seconds", "bytes"} of this process's work. On a stop signal (see `UnitStop`) it returns
    after the next finished unit; units begun and not finished leave nothing behind."""
    by_index = {u.index: u for u in units}
    open_files: dict[int, UnitFile] = {}
    skipped: dict[int, int] = {}
    views, written_bytes, start = 0, 0, time.perf_counter()
    bar = tqdm(total=len(units), desc=f"label[{accelerator.process_index}]", unit="shard",
               disable=not accelerator.is_local_main_process)
    stop = UnitStop()
    for batch in scan_units(units, render, num_workers, pin_memory=torch.cuda.is_available()):
        unit = by_index[int(batch["unit"])]
        out = open_files.get(unit.index) or open_files.setdefault(
            unit.index, UnitFile(Path(out_dir) / unit.source / unit.file_name))
        skipped[unit.index] = skipped.get(unit.index, 0) + int(batch["skipped"])
        if batch["size"]:
            labels = encode_views(teacher_probs(teacher, batch["image"], accelerator), batch["partner_label"],
                                  batch["lam"], targets, topk, num_classes)
            for i in range(batch["size"]):
                info = None
                if meta:
                    info = {"src": batch["key"][i], "replica": unit.replica, "label": int(batch["label"][i]),
                            "partner": batch["partner_key"][i], "partner_label": int(batch["partner_label"][i]),
                            "lam": round(float(batch["lam"][i]), 6)}
                out.write(f"{batch['key'][i]}_r{unit.replica}", batch["jpg"][i], int(batch["label"][i]),
                          labels[i], info)
            views += batch["size"]
        if batch["unit_done"]:
            out = open_files.pop(unit.index)
            size = out.commit()
            written_bytes += size
            records.append({"unit": unit.name, "source": unit.source, "file": f"{unit.source}/{unit.file_name}",
                            "views": out.views, "skipped": skipped.pop(unit.index), "bytes": size,
                            "class_counts": {str(c): n for c, n in sorted(out.class_counts.items())}})
            bar.update(1)
            if stop.requested():
                break
    for unfinished in open_files.values():
        unfinished.discard()
    bar.close()
    return {"views": views, "seconds": time.perf_counter() - start, "bytes": written_bytes}
