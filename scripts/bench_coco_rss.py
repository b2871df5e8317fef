"""Annotation memory per loader worker: CocoDetection's flat arrays against per-image Python objects.

Writes an instances JSON shaped like Objects365's (by default 1/17 of its 1.7 M images and ~25 M boxes;
`--full` for all of it) into a temporary folder, then, once per layout in a fresh interpreter, loads it,
forks `--workers` DataLoader workers that each read every image's annotations once (file name, id, boxes,
labels; no image is decoded) and reports each worker's private memory (USS) and proportional share (PSS)
before and after, the parent's RSS after loading, its peak RSS and the load time. "old" rebuilds the storage
the dataset had before (sorted image dicts, a dict of small box and label arrays per image id); "new" is
`distill.data.coco.CocoDetection`. The JSON is deleted afterwards.

    python scripts/bench_coco_rss.py [--images 100000] [--full] [--workers 2] [--layouts old new]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

OBJECTS365 = (1_700_000, 25_000_000, 365)  # images, boxes, categories
MB = 2**20


def write_instances(path: Path, images: int, boxes: int, categories: int, seed: int = 0) -> None:
    """Objects365-like records (its key names, ~1% crowd boxes, ids 1..n), images first and categories last,
    as COCO orders them; a few images have no box."""
    rng = np.random.default_rng(seed)
    per_image = rng.poisson(boxes / images, images)
    with open(path, "w") as f:
        f.write('{"info": {"description": "synthetic"}, "images": [')
        for start in range(0, images, 100_000):
            ids = range(start + 1, min(images, start + 100_000) + 1)
            f.write(("" if start == 0 else ", ") + ", ".join(
                f'{{"height": 512, "id": {i}, "license": 5, "width": 683, '
                f'"file_name": "images/v2/patch{i % 51}/objv2_train_{i:08d}.jpg", "url": ""}}' for i in ids))
        f.write('], "annotations": [')
        image_of = np.repeat(np.arange(1, images + 1), per_image)
        for start in range(0, len(image_of), 500_000):
            chunk = image_of[start:start + 500_000]
            xy = rng.uniform(0, 400, (len(chunk), 2)).round(2).tolist()
            wh = rng.uniform(1, 250, (len(chunk), 2)).round(2).tolist()
            cats = rng.integers(1, categories + 1, len(chunk)).tolist()
            crowd = (rng.random(len(chunk)) < 0.01).astype(int).tolist()
            f.write(("" if start == 0 else ", ") + ", ".join(
                f'{{"id": {start + k + 1}, "iscrowd": {crowd[k]}, "isfake": 0, '
                f'"area": {wh[k][0] * wh[k][1]:.2f}, "isreflected": 0, '
                f'"bbox": [{xy[k][0]}, {xy[k][1]}, {wh[k][0]}, {wh[k][1]}], '
                f'"image_id": {i}, "category_id": {cats[k]}}}' for k, i in enumerate(chunk.tolist())))
        f.write('], "categories": [' + ", ".join(
            f'{{"name": "class {c}", "id": {c}}}' for c in range(1, categories + 1)) + "]}")


class OldLayout:
    """The storage CocoDetection had before the flat arrays, rebuilt as it was (checks left out)."""

    def __init__(self, image_dir: Path, ann_file: Path):
        self.image_dir = image_dir
        coco = json.loads(Path(ann_file).read_text())
        own = sorted(({"id": c["id"], "name": c.get("name", str(c["id"]))} for c in coco["categories"]),
                     key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in own]
        self.label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        self.images = sorted(coco["images"], key=lambda im: im["id"])
        boxes, labels = defaultdict(list), defaultdict(list)
        for ann in coco["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            boxes[ann["image_id"]].append(ann["bbox"])
            labels[ann["image_id"]].append(self.label_of[ann["category_id"]])
        self._boxes = {k: np.asarray(v, dtype=np.float32).reshape(-1, 4) for k, v in boxes.items()}
        self._labels = {k: np.asarray(v, dtype=np.int64) for k, v in labels.items()}

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.images[index]["file_name"]

    def image_id(self, index: int) -> int:
        return int(self.images[index]["id"])

    def annotations(self, index: int, width: int, height: int):
        image_id = self.images[index]["id"]
        boxes = self._boxes.get(image_id, np.zeros((0, 4), np.float32)).copy()
        labels = self._labels.get(image_id, np.zeros((0,), np.int64))
        x0, y0 = boxes[:, 0].clip(0, width), boxes[:, 1].clip(0, height)
        x1, y1 = (boxes[:, 0] + boxes[:, 2]).clip(0, width), (boxes[:, 1] + boxes[:, 3]).clip(0, height)
        keep = (x1 - x0 >= 1) & (y1 - y0 >= 1)
        return np.stack([x0, y0, x1 - x0, y1 - y0], 1)[keep], labels[keep]


def measure(layout: str, ann_file: Path, workers: int) -> dict:
    """Load with `layout`, then let each worker read every annotation; memory in MiB."""
    import psutil
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from distill.data.coco import CocoDetection

    image_dir = ann_file.parent / "images"  # empty: no image is read
    parent = psutil.Process()
    base = parent.memory_info().rss / MB  # the interpreter with torch and distill imported
    start = time.perf_counter()
    dataset = OldLayout(image_dir, ann_file) if layout == "old" else CocoDetection(image_dir, ann_file)
    load_s = time.perf_counter() - start

    class ReadAll(IterableDataset):
        def __iter__(self):
            me = psutil.Process()
            before = me.memory_full_info()
            tick = time.perf_counter()
            boxes = 0
            for i in range(len(dataset)):
                dataset.image_path(i)
                boxes += len(dataset.annotations(i, 683, 512)[0])
                if layout == "new":
                    dataset.images.image_id(i)
                else:
                    dataset.image_id(i)
            after = me.memory_full_info()
            yield {"boxes": boxes, "read_s": time.perf_counter() - tick,
                   **{f"{k}_{when}": getattr(m, k) / MB for when, m in (("0", before), ("1", after))
                      for k in ("uss", "pss", "rss")}}

    torch.set_num_threads(1)
    rows = list(DataLoader(ReadAll(), batch_size=None, num_workers=workers))
    return {"layout": layout, "images": len(dataset), "load_s": load_s, "parent_base": base,
            "parent_rss": parent.memory_info().rss / MB,
            "parent_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "workers": rows}


def report(results: list[dict]) -> None:
    print("| layout | images | boxes | load s | parent RSS: before load / after / peak, MiB "
          "| per worker: USS growth MiB | PSS growth MiB | USS after MiB | read s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        w = r["workers"]
        cell = lambda f: " / ".join(f"{f(x):,.0f}" for x in w)  # noqa: E731
        print(f"| {r['layout']} | {r['images']:,} | {w[0]['boxes']:,} | {r['load_s']:.1f} "
              f"| {r['parent_base']:,.0f} / {r['parent_rss']:,.0f} / {r['parent_peak']:,.0f} | {cell(lambda x: x['uss_1'] - x['uss_0'])} "
              f"| {cell(lambda x: x['pss_1'] - x['pss_0'])} | {cell(lambda x: x['uss_1'])} "
              f"| {' / '.join(format(x['read_s'], '.1f') for x in w)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000, help="images (boxes and categories in proportion)")
    parser.add_argument("--full", action="store_true", help="Objects365's size: 1.7 M images, ~25 M boxes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layouts", nargs="+", default=["old", "new"], choices=["old", "new"])
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one layout in this process
    parser.add_argument("--ann", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.ann, args.workers)))
        return
    images = OBJECTS365[0] if args.full else args.images
    boxes = round(OBJECTS365[1] * images / OBJECTS365[0])
    with tempfile.TemporaryDirectory() as tmp:
        ann = Path(tmp) / "instances.json"
        (Path(tmp) / "images").mkdir()
        tick = time.perf_counter()
        write_instances(ann, images, boxes, OBJECTS365[2])
        print(f"wrote {ann.stat().st_size / MB:,.0f} MiB of JSON ({images:,} images, ~{boxes:,} boxes) "
              f"in {time.perf_counter() - tick:.0f} s", flush=True)
        results = []
        for layout in args.layouts:
            out = subprocess.run([sys.executable, __file__, "--measure", layout, "--ann", str(ann),
                                  "--workers", str(args.workers)], check=True, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{layout}: loaded in {results[-1]['load_s']:.1f} s", flush=True)
    report(results)


if __name__ == "__main__":
    main()
