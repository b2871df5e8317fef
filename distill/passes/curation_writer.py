"""Curation's second pass: re-read the pool and write the selection as a normal shard source.

Each process writes the kept images of its share of the pool units (JPEG bytes copied as they are), then
its share of the fill copies, read back by offset from the kept shards just written. The main process
renames every part into `shard-%06d.tar` and writes one manifest for the whole source.
"""
from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from distill.data.shards import MANIFEST, write_shards
from distill.engine.checkpoint import atomic_write_text
from distill.passes.selection import Selection, sample_key
from distill.passes.units import RawSample, Unit, decode_image, iter_unit

JPEG_MAGIC = b"\xff\xd8"


def _payload(sample: RawSample):
    """JPEG bytes pass through untouched; other formats are decoded (write_shards encodes them as JPEG)."""
    return sample.data if sample.data.startswith(JPEG_MAGIC) else decode_image(sample)


def write_kept(sel: Selection, units: Sequence[Unit], rank: int, world: int, part_dir: Path, maxcount: int,
               quality: int) -> list[Path]:
    wanted: dict[int, dict[int, int]] = defaultdict(dict)
    for i, (u, o) in enumerate(zip(sel.unit.tolist(), sel.ordinal.tolist())):
        wanted[u][o] = i
    mine = sorted(wanted)[rank::world]

    def samples() -> Iterator[tuple[str, object, int]]:
        for u in mine:
            picks, found = wanted[u], 0
            for sample in iter_unit(units[u]):
                i = picks.get(sample.ordinal)
                if i is not None:
                    found += 1
                    yield sample_key(u, sample.ordinal), _payload(sample), int(sel.cls[i])
            if found != len(picks):
                raise RuntimeError(f"{units[u].name}: {len(picks) - found} selected samples are gone on re-reading "
                                   f"(the pool changed since it was scored); score it again in a new output_dir")

    return write_shards(samples(), part_dir, prefix=f"kept-r{rank:03d}", maxcount=maxcount, quality=quality)


class TarIndex:
    """Random access to the members of tar files by webdataset key and extension."""

    def __init__(self, paths: Sequence[Path], ext: str = "jpg"):
        self.where: dict[str, tuple[Path, int, int]] = {}
        for path in paths:
            with tarfile.open(path) as tar:
                for m in tar:
                    key, _, suffix = m.name.partition(".")
                    if suffix == ext:
                        self.where[key] = (Path(path), m.offset_data, m.size)
        self._files: dict[Path, object] = {}

    def read(self, key: str) -> bytes:
        path, offset, size = self.where[key]
        f = self._files.get(path) or self._files.setdefault(path, open(path, "rb"))
        f.seek(offset)
        return f.read(size)

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def write_fill(sel: Selection, kept_shards: Sequence[Path], rank: int, world: int, part_dir: Path,
               maxcount: int) -> list[Path]:
    mine = np.array_split(np.arange(len(sel.fill_source)), world)[rank]
    if not len(mine):
        return []
    index = TarIndex(kept_shards)

    def samples() -> Iterator[tuple[str, bytes, int]]:
        for j in mine.tolist():
            i = int(sel.fill_source[j])
            key = sample_key(int(sel.unit[i]), int(sel.ordinal[i]))
            yield f"{key}_rep{int(sel.fill_copy[j])}", index.read(key), int(sel.cls[i])

    try:
        return write_shards(samples(), part_dir, prefix=f"fill-r{rank:03d}", maxcount=maxcount)
    finally:
        index.close()


def part_shards(parts_dir: Path, kind: str) -> list[Path]:
    return sorted(parts_dir.glob(f"{kind}-r*/*.tar"))


def clear_output(out_dir: Path) -> None:
    """Remove what an earlier write pass left (shards, manifest, parts) before writing again."""
    for p in out_dir.glob("shard-*.tar"):
        p.unlink()
    (out_dir / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(out_dir / ".parts", ignore_errors=True)


def assemble(out_dir: Path, num_classes: int, extra_manifest: dict) -> dict:
    """Move the parts' shards to `out_dir/shard-%06d.tar` (kept first, then fill) under one manifest."""
    parts_dir = out_dir / ".parts"
    shards, class_counts = [], Counter()
    for part in sorted(parts_dir.glob("kept-r*")) + sorted(parts_dir.glob("fill-r*")):
        manifest = json.loads((part / MANIFEST).read_text())
        class_counts.update({int(c): n for c, n in manifest["class_counts"].items()})
        for s in manifest["shards"]:
            name = f"shard-{len(shards):06d}.tar"
            (part / s["name"]).rename(out_dir / name)
            shards.append({"name": name, "num_samples": s["num_samples"]})
    manifest = {
        "num_samples": int(sum(s["num_samples"] for s in shards)),
        "num_classes": int(num_classes),
        "class_counts": {str(c): int(class_counts[c]) for c in sorted(class_counts)},
        "shards": shards,
        **extra_manifest,
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    shutil.rmtree(parts_dir, ignore_errors=True)
    return manifest
