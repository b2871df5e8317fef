"""Reading a YOLO split's labels and image sizes, first (every file opened) and again (the label cache).

    python scripts/bench_yolo_labels.py                    # 100,000 images in a temporary folder
    python scripts/bench_yolo_labels.py --images 20000 --root /path/on/the/file/system/to/measure

The generated split: `images/train/*.png`, tiny real PNG files (6 sizes from 32x24 to 96x80, so each header
is parsed, ~100 bytes each), and `labels/train/*.txt` with 0-3 boxes each (every tenth image without a label
file). Measured with the files just written, so in the page cache: the first read is the CPU cost of opening
100k label files and 100k image headers on a local disk, not the latency of a cold network file system,
where it is larger. Wall seconds of one process:

- first read: the directory listings and stats, every label file parsed, every image header read, the cache
  written (`labels/train.cache`);
- second read: the listings and stats again (the cache key), the cache loaded; no label file or image opened;
- convert: a run's start with the caches warm: the training split's second read and a validation split (a
  `.txt` list of every hundredth image) read from its cache, both converted into COCO instances and written
  as JSON into the run folder.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from distill.data import yolo
from distill.data.det_layouts import resolve_layout
from distill.detection.recipe import DetDataConfig

SIZES = [(32, 24), (48, 48), (64, 40), (80, 64), (96, 80), (40, 96)]


def generate(root: Path, count: int) -> None:
    pngs = []
    for w, h in SIZES:
        buffer = io.BytesIO()
        Image.new("RGB", (w, h), (120, 60, 30)).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    rng = np.random.default_rng(0)
    images, labels = root / "images" / "train", root / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(count):
        (images / f"{i:07d}.png").write_bytes(pngs[i % len(pngs)])
        if i % 10 == 9:
            continue
        boxes = rng.uniform(0.2, 0.5, size=(int(rng.integers(0, 4)), 4))
        (labels / f"{i:07d}.txt").write_text("".join(f"{j % 3} {b[0]:.6f} {b[1]:.6f} {b[2] / 2:.6f} {b[3] / 2:.6f}\n"
                                                     for j, b in enumerate(boxes)))
    (root / "val.txt").write_text("".join(f"./images/train/{i:07d}.png\n" for i in range(0, count, 100)))
    (root / "data.yaml").write_text("train: images/train\nval: val.txt\nnames: [a, b, c]\n")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--root", type=Path, default=None, help="where to generate (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_yolo_", dir=args.root))
    try:
        seconds, _ = timed(lambda: generate(root, args.images))
        print(f"generated {args.images} images + labels in {seconds:.1f}s under {root}")
        images = yolo.split_images(yolo.read_dataset_yaml(root / "data.yaml"), "train")
        first, split = timed(lambda: yolo.read_split(images, 3))
        assert not split.from_cache and split.cache_file is not None
        second, cached = timed(lambda: yolo.read_split(images, 3))
        assert cached.from_cache and np.array_equal(cached.boxes, split.boxes)
        cfg = OmegaConf.merge(OmegaConf.structured(DetDataConfig), {"root": str(root / "data.yaml")})
        resolve_layout(cfg, root / "run")  # the validation split's first read
        convert, _ = timed(lambda: resolve_layout(cfg, root / "run"))
        boxes, cache_kb = len(split.boxes), split.cache_file.stat().st_size / 1024
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.images} images, "
              f"{boxes} boxes, cache {cache_kb:.0f} KiB")
        print(f"first read (no cache): {first:.2f}s ({first / args.images * 1e6:.0f} us/image)")
        print(f"second read (cache):   {second:.2f}s ({second / args.images * 1e6:.1f} us/image)")
        print(f"train + val (1% of the images) resolved into COCO JSON, caches warm: {convert:.2f}s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
