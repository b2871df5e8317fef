"""The curation report: one CSV row per class, a PNG of the same, and a JSON summary.

Per class: images whose top class it is (`scored`), how many of those were at or below the threshold,
above it (`candidates`), kept (the most confident K), dropped over the cap, repeated to fill up to K,
written in all, the lowest kept confidence, and the histogram of top-class confidences.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from distill.engine.checkpoint import atomic_write_text
from distill.passes.curation_state import ScoreStats
from distill.passes.selection import Selection

COLUMNS = ("class", "name", "scored", "below_threshold", "candidates", "kept", "dropped_over_cap", "repeated",
           "written", "min_kept_conf")


def class_table(stats: ScoreStats, sel: Selection) -> list[dict]:
    C = stats.num_classes
    kept = sel.kept_per_class(C)
    repeated = sel.repeated_per_class(C)
    min_conf = np.full(C, np.nan)
    if len(sel.cls):
        np.fmin.at(min_conf, sel.cls, sel.conf.astype(np.float64))
    rows = []
    for c in range(C):
        rows.append({
            "class": c, "scored": int(stats.top1[c]), "below_threshold": int(stats.top1[c] - stats.candidates[c]),
            "candidates": int(stats.candidates[c]), "kept": int(kept[c]),
            "dropped_over_cap": int(stats.candidates[c] - kept[c]), "repeated": int(repeated[c]),
            "written": int(kept[c] + repeated[c]),
            "min_kept_conf": None if np.isnan(min_conf[c]) else round(float(min_conf[c]), 4),
            "hist": stats.hist[c].tolist(),
        })
    return rows


def write_report(out_dir: Path, stats: ScoreStats, sel: Selection, threshold: float,
                 class_names: Optional[Sequence[str]] = None, extra: Optional[dict] = None) -> dict:
    rows = class_table(stats, sel)
    edges = np.linspace(0, 1, stats.bins + 1)
    hist_cols = [f"conf_{a:.2f}_{b:.2f}" for a, b in zip(edges[:-1], edges[1:])]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(list(COLUMNS) + hist_cols)
    for r in rows:
        name = class_names[r["class"]] if class_names and r["class"] < len(class_names) else ""
        writer.writerow([r["class"], name] + [r[k] if r[k] is not None else "" for k in COLUMNS[2:]] + r["hist"])
    atomic_write_text(out_dir / "report.csv", buf.getvalue())

    summary = {
        "threshold": threshold, "per_class": sel.k, "fill": sel.fill_mode,
        "scored": stats.scored, "skipped_unreadable": stats.skipped,
        "candidates": int(stats.candidates.sum()), "kept": int(len(sel.cls)),
        "repeated": int(len(sel.fill_source)), "written": int(len(sel.cls) + len(sel.fill_source)),
        "classes_full": int(sum(r["written"] >= sel.k for r in rows)),
        "classes_short": [r["class"] for r in rows if 0 < r["written"] < sel.k],
        "classes_empty": [r["class"] for r in rows if r["written"] == 0],
        **(extra or {}),
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    plot_report(out_dir / "report.png", rows, stats, threshold, sel.k)
    return summary


def plot_report(path: Path, rows: list[dict], stats: ScoreStats, threshold: float, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = np.arange(len(rows))
    kept = np.array([r["kept"] for r in rows])
    repeated = np.array([r["repeated"] for r in rows])
    dropped = np.array([r["dropped_over_cap"] for r in rows])
    below = np.array([r["below_threshold"] for r in rows])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, min(24, len(rows) * 0.25)), 8), constrained_layout=True)
    width = 1.0 if len(rows) > 100 else 0.8
    ax1.bar(classes, kept, width, label="kept", color="tab:green")
    ax1.bar(classes, repeated, width, bottom=kept, label="repeated (fill)", color="tab:olive")
    ax1.bar(classes, dropped, width, bottom=kept + repeated, label="dropped over cap", color="tab:red", alpha=0.6)
    ax1.bar(classes, below, width, bottom=kept + repeated + dropped, label="at/below threshold", color="tab:gray",
            alpha=0.4)
    ax1.axhline(k, color="k", lw=0.8, ls="--", label=f"K = {k}")
    ax1.set_ylim(0, max(k, int((kept + repeated + dropped + below).max(initial=0))) * 1.3)  # room for the legend
    ax1.set_xlabel("class")
    ax1.set_ylabel("images")
    ax1.set_title("per-class curation")
    ax1.legend(fontsize=8, ncol=5)
    edges = np.linspace(0, 1, stats.bins + 1)
    ax2.stairs(stats.hist.sum(axis=0), edges, fill=True, alpha=0.6)
    ax2.axvline(threshold, color="tab:red", ls="--", label=f"threshold {threshold}")
    ax2.set_yscale("log")
    ax2.set_xlabel("top-class probability")
    ax2.set_ylabel("images (all classes)")
    ax2.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path.write_bytes(buf.getvalue())
