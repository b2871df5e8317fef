"""What offline labelling leaves for training: a manifest per source folder, and a data mix over the folders
with the original weights and schedule, `flip` as the only augmentation and no mixup (views are stored mixed
already)."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import yaml

from distill.data.mix import DataMix
from distill.data.shards import MANIFEST
from distill.engine.checkpoint import atomic_write_text

OFFLINE_AUGMENT = {"name": "flip"}


def write_source_manifests(out_dir: Path, records: dict[str, dict], sources: Sequence[str], num_classes: int,
                           extra: dict) -> dict[str, dict]:
    """`out_dir/<source>/manifest.json` from the finished-unit records; returns them by source."""
    manifests = {}
    for source in sources:
        recs = sorted((r for r in records.values() if r["source"] == source), key=lambda r: r["file"])
        counts = Counter()
        for r in recs:
            counts.update({int(c): n for c, n in r["class_counts"].items()})
        replicas = {r["unit"].split("/")[1] for r in recs}
        manifest = {
            "num_samples": int(sum(r["views"] for r in recs)),
            # distinct source images (the views of one replica): an epoch counts these, not the views
            "images": int(sum(r["views"] for r in recs if r["unit"].split("/")[1] == "r0000")),
            "replicas": len(replicas),
            "num_classes": int(num_classes),
            "class_counts": {str(c): int(counts[c]) for c in sorted(counts)},
            "shards": [{"name": Path(r["file"]).name, "num_samples": r["views"]} for r in recs],
            "bytes": int(sum(r["bytes"] for r in recs)),
            **extra,
        }
        atomic_write_text(out_dir / source / MANIFEST, json.dumps(manifest, indent=1))
        manifests[source] = manifest
    return manifests


def offline_mix(mix: DataMix, sources: Sequence[str], out_dir: Path, data_root: Path) -> dict:
    """The mix over the labelled views: same sources (those labelled), weights and schedule."""
    raw = yaml.safe_load(Path(mix.path).read_text()) if mix.path else {}
    folder = Path(os.path.relpath(out_dir, data_root)) if _inside(out_dir, data_root) else Path(out_dir).resolve()
    result = {
        "description": f"offline teacher labels on stored views of {Path(mix.path).stem if mix.path else 'a mix'}"
                       f" ({raw.get('description', '')})".replace(" ()", ""),
        "sources": {
            s.name: {"shards": str(folder / s.name), "augment": dict(OFFLINE_AUGMENT), "weight": s.weight,
                     "mixup": False}
            for s in mix.sources if s.name in sources
        },
    }
    if raw.get("schedule"):
        result["schedule"] = [{"at": p["at"], "weights": {k: v for k, v in p["weights"].items() if k in sources}}
                              for p in raw["schedule"]]
    return result


def write_mix(path: Path, mix_dict: dict) -> None:
    atomic_write_text(path, yaml.safe_dump(mix_dict, sort_keys=False))


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False
