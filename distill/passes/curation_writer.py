"""Curation's second pass: the selection written as a normal shard source, in bounded memory per process.

The main process turns the selection into a plan on disk (`.progress/write/`): per process, the selected
(unit, position, class) rows of its share of the pool units in reading order; for everyone, the fill copies in
writing order and, per kept image, which process writes it and where in its stream. Every process then streams
its part of the plan from disk (memory-mapped), never the whole selection:

- kept: it reads its units one at a time, holding only that unit's picks, and copies the selected images'
  bytes into `.parts/kept-rNNN/` shards of `maxcount`, with each image's byte offset in a side file;
- fill: its contiguous share of the fill copies, a block at a time: each copy's bytes are read from the kept
  shards by offset (reads in file order within a block), then written in the planned (shuffled) order.

Shards are written under a temporary name and renamed when complete; a rerun keeps the complete ones and goes
on after them, so an interrupted pass loses at most one shard per process. The main process then renames the
parts into `shard-%06d.tar` under one manifest.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from distill.data.shards import MANIFEST, encode_jpeg
from distill.engine.checkpoint import atomic_write_text
from distill.passes.selection import Selection, sample_key
from distill.passes.units import RawSample, Unit, decode_image, iter_unit

JPEG_MAGIC = b"\xff\xd8"
KEPT_ROW = np.dtype([("unit", "<u4"), ("ordinal", "<u4"), ("cls", "<i4")])
# per kept image (selection index): the process writing it, its place in that process's stream, its origin
WHERE_ROW = np.dtype([("rank", "<u4"), ("position", "<u8"), ("cls", "<i4"), ("unit", "<u4"), ("ordinal", "<u4")])
FILL_ROW = np.dtype([("source", "<u8"), ("copy", "<u4")])
LOC_ROW = np.dtype([("offset", "<u8"), ("size", "<u8")])
PLAN = "plan.json"
FILL_BLOCK = 256  # fill copies read, then written, at a time: the pass's memory is this many images


# ---- the plan (main process) --------------------------------------------------------------------------


def plan_matches(plan_dir: Path, digest: str) -> bool:
    path = Path(plan_dir) / PLAN
    try:
        return json.loads(path.read_text()).get("fingerprint") == digest
    except (OSError, json.JSONDecodeError):
        return False


def write_plan(sel: Selection, world: int, plan_dir: Path, digest: str) -> dict:
    """Split the selection into the per-process files; `plan.json`, written last, marks the plan complete.
    Units with a selected image go to processes in turn, in unit order."""
    plan_dir = Path(plan_dir)
    shutil.rmtree(plan_dir, ignore_errors=True)
    plan_dir.mkdir(parents=True)
    order = np.lexsort((sel.ordinal, sel.unit))  # reading order: unit, then position in it
    units, unit_slot = np.unique(sel.unit[order], return_inverse=True)
    owner = unit_slot % world
    where = np.zeros(len(sel.cls), WHERE_ROW)
    where["cls"], where["unit"], where["ordinal"] = sel.cls, sel.unit, sel.ordinal
    kept = []
    for rank in range(world):
        rows = order[owner == rank]
        where["rank"][rows], where["position"][rows] = rank, np.arange(len(rows))
        part = np.zeros(len(rows), KEPT_ROW)
        part["unit"], part["ordinal"], part["cls"] = sel.unit[rows], sel.ordinal[rows], sel.cls[rows]
        np.save(plan_dir / f"kept-r{rank:03d}.npy", part)
        kept.append(len(rows))
    np.save(plan_dir / "where.npy", where)
    fill = np.zeros(len(sel.fill_source), FILL_ROW)
    fill["source"], fill["copy"] = sel.fill_source, sel.fill_copy
    np.save(plan_dir / "fill.npy", fill)
    plan = {"fingerprint": digest, "world": world, "kept": kept, "fill": len(fill)}
    atomic_write_text(plan_dir / PLAN, json.dumps(plan))
    return plan


def fill_share(total: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of this process's fill copies: contiguous, sizes differing by at most one."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


# ---- writing shards that survive an interruption ---------------------------------------------------------


class PartWriter:
    """Samples (key, jpg bytes, class) into `<dir>/<prefix>-%06d.tar` of `maxcount` samples each. A shard
    appears under its name only when complete; with `offsets`, each jpg's (offset, size) in its shard is
    appended to `<prefix>.loc` once the shard is in place. Opening an existing part keeps its complete shards:
    `done` says how many samples they hold, and writing goes on from there."""

    def __init__(self, folder: Path, prefix: str, maxcount: int, offsets: bool = False):
        self.folder, self.prefix, self.maxcount, self.offsets = Path(folder), prefix, int(maxcount), offsets
        self.folder.mkdir(parents=True, exist_ok=True)
        self.loc_path = self.folder / f"{prefix}.loc"
        self.shards = 0
        while self._path(self.shards).is_file():
            self.shards += 1
        if offsets:  # a shard renamed but its offsets not yet appended is written again
            have = self.loc_path.stat().st_size // LOC_ROW.itemsize if self.loc_path.is_file() else 0
            self.shards = min(self.shards, have // self.maxcount)
            with open(self.loc_path, "ab") as f:
                f.truncate(self.shards * self.maxcount * LOC_ROW.itemsize)
        for p in self.folder.glob(f"{prefix}-*.tar"):
            if int(p.stem.rsplit("-", 1)[1]) >= self.shards:
                p.unlink()
        for p in self.folder.glob(f".{prefix}-*.tmp"):
            p.unlink()
        self.done = self.shards * self.maxcount
        self.written = 0
        self._tar: Optional[tarfile.TarFile] = None
        self._locs: list[tuple[int, int]] = []
        self._count = 0
        self._mtime = int(time.time())

    def _path(self, n: int) -> Path:
        return self.folder / f"{self.prefix}-{n:06d}.tar"

    def _member(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), self._mtime, 0o644
        self._tar.addfile(info, io.BytesIO(data))
        return self._tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # where the data began

    def write(self, key: str, jpg: bytes, label: int) -> None:
        if self._tar is None:
            self._tmp = self.folder / f".{self.prefix}-{self.shards:06d}.tmp"
            self._stream = open(self._tmp, "wb")
            self._tar = tarfile.open(fileobj=self._stream, mode="w", format=tarfile.GNU_FORMAT)
        self._locs.append((self._member(f"{key}.jpg", jpg), len(jpg)))
        self._member(f"{key}.cls", str(int(label)).encode())
        self._count += 1
        self.written += 1
        if self._count == self.maxcount:
            self._commit()

    def _commit(self) -> None:
        self._tar.close()  # the tar trailer; the stream is ours to close
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        os.replace(self._tmp, self._path(self.shards))
        if self.offsets:
            with open(self.loc_path, "ab") as f:
                f.write(np.array(self._locs, LOC_ROW).tobytes())
                f.flush()
                os.fsync(f.fileno())
        self.shards += 1
        self._tar, self._locs, self._count = None, [], 0

    def close(self, total: int) -> None:
        """Finish the last shard and record the part (`total`: its samples) for `assemble`."""
        if self._tar is not None:
            self._commit()
        counts = [min(self.maxcount, total - i * self.maxcount) for i in range(self.shards)]
        atomic_write_text(self.folder / f"{self.prefix}.json", json.dumps(
            {"shards": [{"name": self._path(i).name, "num_samples": n} for i, n in enumerate(counts)]}))


# ---- the two writes (every process) -----------------------------------------------------------------------


def _payload(sample: RawSample, quality: int) -> bytes:
    """JPEG bytes pass through untouched; other formats are decoded and encoded as JPEG."""
    if sample.data is not None and sample.data.startswith(JPEG_MAGIC):
        return sample.data
    return encode_jpeg(decode_image(sample), quality)


def part_dir(parts: Path, kind: str, rank: int) -> Path:
    return Path(parts) / f"{kind}-r{rank:03d}"


def write_kept(plan_dir: Path, units: Sequence[Unit], rank: int, parts: Path, maxcount: int, quality: int) -> int:
    """This process's kept images, unit by unit from its plan file; returns how many it wrote this run."""
    rows = np.load(Path(plan_dir) / f"kept-r{rank:03d}.npy", mmap_mode="r")
    out = PartWriter(part_dir(parts, "kept", rank), f"kept-r{rank:03d}", maxcount, offsets=True)
    unit_col, start = rows["unit"], 0
    while start < len(rows):
        u = int(unit_col[start])
        end = int(np.searchsorted(unit_col, u, side="right"))
        if end > out.done:  # a unit whose images are all in complete shards is not read again
            picks = dict(zip(rows["ordinal"][start:end].tolist(), range(start, end)))
            found = 0
            for sample in iter_unit(units[u]):
                q = picks.get(sample.ordinal)
                if q is None:
                    continue
                found += 1
                if q >= out.done:
                    out.write(sample_key(u, sample.ordinal), _payload(sample, quality), int(rows["cls"][q]))
            if found != end - start:
                raise RuntimeError(f"{units[u].name}: {end - start - found} selected samples are gone on re-reading "
                                   f"(the pool changed since it was scored); score it again in a new output_dir")
        start = end
    out.close(len(rows))
    return out.written


class _KeptReader:
    """Bytes of kept images by (process, position in its stream), through its offsets file; a few files open."""

    def __init__(self, parts: Path, maxcount: int, max_open: int = 16):
        self.parts, self.maxcount, self.max_open = Path(parts), maxcount, max_open
        self.locs: dict[int, np.ndarray] = {}
        self.files: OrderedDict[Path, int] = OrderedDict()  # unbuffered descriptors: reads are exact ranges

    def location(self, rank: int, position: int) -> tuple[Path, int, int]:
        if rank not in self.locs:
            folder = part_dir(self.parts, "kept", rank)
            self.locs[rank] = np.memmap(folder / f"kept-r{rank:03d}.loc", LOC_ROW, mode="r")
        loc = self.locs[rank][position]
        shard = part_dir(self.parts, "kept", rank) / f"kept-r{rank:03d}-{position // self.maxcount:06d}.tar"
        return shard, int(loc["offset"]), int(loc["size"])

    def read(self, path: Path, offset: int, size: int) -> bytes:
        fd = self.files.pop(path, None)
        self.files[path] = os.open(path, os.O_RDONLY) if fd is None else fd
        while len(self.files) > self.max_open:
            os.close(self.files.popitem(last=False)[1])
        data = os.pread(self.files[path], size, offset)
        if len(data) != size:
            raise RuntimeError(f"{path}: {size} bytes expected at offset {offset}, {len(data)} read; the kept shards "
                               f"changed since they were written")
        return data

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)


def write_fill(plan_dir: Path, rank: int, world: int, parts: Path, maxcount: int, block: int = FILL_BLOCK) -> int:
    """This process's share of the fill copies, read from the kept shards; returns how many it wrote this run."""
    fill = np.load(Path(plan_dir) / "fill.npy", mmap_mode="r")
    where = np.load(Path(plan_dir) / "where.npy", mmap_mode="r")
    lo, hi = fill_share(len(fill), rank, world)
    out = PartWriter(part_dir(parts, "fill", rank), f"fill-r{rank:03d}", maxcount)
    reader = _KeptReader(parts, maxcount)
    try:
        for b in range(lo + out.done, hi, block):
            rows = np.asarray(fill[b:min(b + block, hi)])
            src = np.asarray(where[rows["source"]])
            reads = sorted((*reader.location(int(s["rank"]), int(s["position"])), j) for j, s in enumerate(src))
            data: list[bytes] = [b""] * len(rows)
            for path, offset, size, j in reads:
                data[j] = reader.read(path, offset, size)
            for j, (row, s) in enumerate(zip(rows, src)):
                out.write(f"{sample_key(int(s['unit']), int(s['ordinal']))}_rep{int(row['copy'])}", data[j], int(s["cls"]))
    finally:
        reader.close()
    out.close(hi - lo)
    return out.written


# ---- the output (main process) ----------------------------------------------------------------------------


def clear_output(out_dir: Path) -> None:
    """Remove what an earlier write pass left (shards, manifest, parts, plan) before writing again."""
    for p in Path(out_dir).glob("shard-*.tar"):
        p.unlink()
    (Path(out_dir) / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(Path(out_dir) / ".parts", ignore_errors=True)


def assemble(out_dir: Path, world: int, sel: Selection, num_classes: int, extra_manifest: dict) -> dict:
    """Move the parts' shards to `out_dir/shard-%06d.tar` (kept first, then fill) under one manifest."""
    parts_dir = Path(out_dir) / ".parts"
    shards = []
    for kind in ("kept", "fill"):
        for rank in range(world):
            folder = part_dir(parts_dir, kind, rank)
            for s in json.loads((folder / f"{kind}-r{rank:03d}.json").read_text())["shards"]:
                name = f"shard-{len(shards):06d}.tar"
                (folder / s["name"]).rename(Path(out_dir) / name)
                shards.append({"name": name, "num_samples": s["num_samples"]})
    counts = sel.kept_per_class(num_classes) + sel.repeated_per_class(num_classes)
    manifest = {
        "num_samples": int(sum(s["num_samples"] for s in shards)),
        "num_classes": int(num_classes),
        "class_counts": {str(c): int(n) for c, n in enumerate(counts) if n},
        "shards": shards,
        **extra_manifest,
    }
    atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=1))
    shutil.rmtree(parts_dir, ignore_errors=True)
    return manifest
