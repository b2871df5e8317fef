"""A detection run's report at its end: the per-class AP table, and pictures of the run in its folder.

curves.png holds the training losses, the learning rates and the AP of each evaluation over the steps, read
from the run's metrics.jsonl; pr_curves.png the precision-recall curve of each class at IoU 0.5, from the
final evaluation's precision array (`distill.detection.evaluate.class_scores`). The pictures need matplotlib
(`pip install ".[plot]"`); without it they are skipped with one line in the log, never failing a run.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

logger = logging.getLogger("distill")

FEW_CLASSES = 10  # up to this many classes share one precision-recall plot; more get a grid of small ones


def class_table(per_class: list[dict]) -> str:
    """The per-class rows as an aligned text table (a class without ground truth reads -1, as COCO's)."""
    width = max(len("class"), *(len(r["name"]) for r in per_class))
    lines = [f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}  {'boxes':>6}"]
    lines += [f"{r['name']:<{width}}  {r['AP']:6.3f}  {r['AP50']:6.3f}  {r['gt']:6d}" for r in per_class]
    return "\n".join(lines)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that does not parse (cut short by a killed process, which a
    resumed run then appended after) is left out."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def write_plots(folder: Path, per_class: Optional[list[dict]], pr50: Optional[dict]) -> list[Path]:
    """curves.png and (with per-class scores) pr_curves.png in `folder`; the files written. Pictures never
    fail a finished run: any error is one warning line."""
    try:
        from matplotlib.figure import Figure  # noqa: F401  (the object API: no pyplot state, no display)
    except ImportError:
        logger.info("plots skipped: matplotlib is not installed (pip install \".[plot]\" for curves.png and "
                    "pr_curves.png)")
        return []
    folder, written = Path(folder), []
    try:
        if (folder / "metrics.jsonl").is_file():
            written.append(plot_curves(read_metrics(folder / "metrics.jsonl"), folder / "curves.png"))
        if per_class and pr50:
            written.append(plot_pr_curves(per_class, pr50, folder / "pr_curves.png"))
    except Exception as e:
        logger.warning("plots of %s not written: %s: %s", folder, type(e).__name__, e)
    return written


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [s for s, _ in points], [v for _, v in points]


def loss_terms(records: list[dict]) -> list[str]:
    """The summed loss and its last decoder layer's terms (`loss_vfl`, `loss_bbox`, ...): the auxiliary,
    denoising and encoder copies of each term would crowd the plot."""
    keys = {k for r in records for k in r if k.startswith("loss")}
    main = sorted(k for k in keys if k != "loss" and not any(tag in k for tag in ("_aux", "_dn", "_enc", "_pre")))
    return (["loss"] if "loss" in keys else []) + main


def plot_curves(records: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4), layout="constrained")
    losses, rates, scores = fig.subplots(1, 3)
    for key in loss_terms(records):
        losses.plot(*_series(records, key), label=key, linewidth=2 if key == "loss" else 1)
    losses.set(title="training loss", xlabel="step", yscale="log")
    for key in ("lr", "backbone_lr"):
        rates.plot(*_series(records, key), label=key)
    rates.set(title="learning rate", xlabel="step")
    for key in ("AP", "AP50", "AP75"):
        steps, values = _series(records, key)
        scores.plot(steps, values, marker="o", label=key)
    # the three panels share the run's steps, also when AP was measured once (at the end)
    last = max((r.get("step") or 0 for r in records), default=0)
    scores.set(title="validation AP", xlabel="step", ylim=(0, 1), xlim=(0, max(1, last) * 1.02))
    for ax in (losses, rates, scores):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def plot_pr_curves(per_class: list[dict], pr50: dict, path: Path) -> Path:
    """One plot with a line per class where the classes are few, else a grid of one small plot per class;
    classes without ground truth are left out."""
    from matplotlib.figure import Figure

    recall = pr50["recall"]
    shown = [(row, curve) for row, curve in zip(per_class, pr50["precision"]) if row["gt"] > 0]
    if len(shown) <= FEW_CLASSES:
        fig = Figure(figsize=(6, 5), layout="constrained")
        ax = fig.subplots()
        for row, curve in shown:
            ax.plot(recall, curve, label=f"{row['name']} (AP50 {row['AP50']:.3f})")
        _axes(ax, "precision-recall at IoU 0.5")
        if shown:
            ax.legend(fontsize=8)
    else:
        cols = math.ceil(math.sqrt(len(shown)))
        rows = math.ceil(len(shown) / cols)
        fig = Figure(figsize=(2 * cols, 2 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
        for ax, (row, curve) in zip(axes, shown):
            ax.plot(recall, curve)
            ax.set_title(f"{row['name']} {row['AP50']:.2f}", fontsize=8)
            _axes(ax)
            ax.label_outer()  # the axis names on the grid's edges only
        for ax in axes[len(shown):]:
            ax.set_axis_off()
        fig.suptitle("precision-recall at IoU 0.5 (AP50 in the titles)")
    fig.savefig(path, dpi=100)
    return path


def _axes(ax, title: Optional[str] = None) -> None:
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
