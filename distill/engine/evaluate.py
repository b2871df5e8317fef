"""Top-1 / top-5 of several classifiers over one pass of the validation shards, summed across processes."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import torch

from distill.engine.progress import ProgressBar


@torch.no_grad()
def evaluate_topk(
    models: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    loader: Iterable[dict],
    accelerator,
    ks: tuple[int, ...] = (1, 5),
    total_images: Optional[int] = None,
) -> dict[str, float]:
    """`models` map a name to a function of a [0, 1] image batch; returns `{name}_top{k}` in percent and
    `val_samples`, the number of images evaluated over all processes. `total_images`: how many this process
    will see (the progress bar's total), when known."""
    device = accelerator.device
    correct = torch.zeros(len(models), len(ks), device=device, dtype=torch.float64)
    seen = torch.zeros((), device=device, dtype=torch.float64)
    bar = ProgressBar(total_images, "eval", unit="img", enabled=accelerator.is_main_process)
    for batch in loader:
        bar.update(bar.step + len(batch["label"]), images=len(batch["label"]))
        images = batch["image"].to(device, non_blocking=True).float().div_(255)
        labels = batch["label"].to(device, non_blocking=True)
        seen += labels.numel()
        with accelerator.autocast():
            for i, fn in enumerate(models.values()):
                logits = fn(images)
                top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
                hits = top == labels[:, None]
                for j, k in enumerate(ks):
                    correct[i, j] += hits[:, :k].any(dim=-1).sum()
    bar.close()
    correct = accelerator.reduce(correct, reduction="sum")
    seen = int(accelerator.reduce(seen, reduction="sum"))
    return {
        **{f"{name}_top{k}": float(100 * correct[i, j] / max(1, seen)) for i, name in enumerate(models)
           for j, k in enumerate(ks)},
        "val_samples": seen,
    }
