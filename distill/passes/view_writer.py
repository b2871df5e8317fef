"""Writing the labelled views: one tar per unit, made visible by a rename once complete, and an append-only
record of finished units per process. A unit counts as done when its record exists and its file is there;
anything else is written again, so an interruption at any point costs at most the units in flight."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Optional

import webdataset as wds

from distill.passes.soft_labels import MEMBER


class UnitFile:
    def __init__(self, final: Path):
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp")
        self._stream = open(self.tmp, "wb")
        # an integer mtime keeps tarfile from adding a 1 KB PAX header to every member (a float needs one)
        self._tar = wds.TarWriter(self._stream, encoder=False, mtime=int(time.time()))
        self.views = 0
        self.class_counts: dict[int, int] = {}

    def write(self, key: str, jpg: bytes, label: int, record: bytes, meta: Optional[dict]) -> None:
        sample = {"__key__": re.sub(r"[^0-9A-Za-z_/-]", "_", key), "jpg": jpg, "cls": str(int(label)).encode(),
                  MEMBER: record}
        if meta is not None:
            sample["json"] = json.dumps(meta, separators=(",", ":")).encode()
        self._tar.write(sample)
        self.views += 1
        if int(label) >= 0:  # views of unlabelled sources (label -1) have no class to count
            self.class_counts[int(label)] = self.class_counts.get(int(label), 0) + 1

    def commit(self) -> int:
        """Close, flush to disk and rename into place; returns the file's size in bytes."""
        self._tar.close()  # the tar trailer; the stream is ours to close
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        os.replace(self.tmp, self.final)
        return self.final.stat().st_size

    def discard(self) -> None:
        """A unit left unfinished (the pass stopped early): nothing of it stays."""
        self._stream.close()
        self.tmp.unlink(missing_ok=True)


class LabelRecords:
    """`.progress/label-rank<r>.jsonl` under the output folder: one JSON line per finished unit."""

    def __init__(self, out_dir: Path, rank: int):
        self.path = Path(out_dir) / ".progress" / f"label-rank{rank:03d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def finished(out_dir: Path) -> dict[str, dict]:
        """Finished units of every process so far, by unit name (only those whose file exists)."""
        done: dict[str, dict] = {}
        for path in sorted((Path(out_dir) / ".progress").glob("label-rank*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: that unit is simply done again
                if (Path(out_dir) / rec["file"]).is_file():
                    done[rec["unit"]] = rec
        return done
