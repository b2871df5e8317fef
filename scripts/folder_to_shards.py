"""Convert an ImageFolder-style tree (one subfolder per class) into webdataset shards plus manifest.json.

    python scripts/folder_to_shards.py /datasets/imagenet/train /data/imagenet --prefix train --maxcount 1250 \
        --resize-short 320 --workers 16
    python scripts/folder_to_shards.py /datasets/imagenet/val /data/imagenet/val --maxcount 1000

Classes are the sorted subfolder names (as torchvision's ImageFolder numbers them); the manifest keeps the
names under "classes". Samples are shuffled (seeded) before writing so every shard holds a mix of classes,
which the loaders need: they split sources over processes and workers by shard. JPEG files are stored as
they are unless resized; other formats are re-encoded as JPEG. Unreadable images are skipped and listed.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from multiprocessing import Pool
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from distill.data.shards import MANIFEST, encode_jpeg, write_shards

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}


def find_images(src: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SystemExit(f"error: {src} has no class subfolders (expected an ImageFolder-style tree)")
    items = []
    for label, name in enumerate(classes):
        for path in sorted((src / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((path, label))
    return classes, items


def _decode(data: bytes) -> Optional[np.ndarray]:
    """HWC uint8 RGB, or None. OpenCV first (fast); PIL for what OpenCV does not read (GIF, palettes)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is not None:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    try:
        with Image.open(io.BytesIO(data)) as pil:
            return np.asarray(pil.convert("RGB"))
    except Exception:
        return None


class LoadImage:
    """(path, label) -> (key, JPEG bytes or None, label, error). A class so worker processes can pickle it."""

    def __init__(self, src: Path, resize_short: Optional[int], quality: int):
        self.src, self.resize_short, self.quality = src, resize_short, quality

    def __call__(self, item: tuple[Path, int]):
        path, label = item
        key = str(path.relative_to(self.src).with_suffix("")).replace(".", "_").replace("/", "__")
        try:
            data = path.read_bytes()
        except OSError as exc:
            return key, None, label, f"{path}: {exc}"
        image = _decode(data)
        if image is None:
            return key, None, label, f"{path}: not a readable image"
        short = min(image.shape[:2])
        if self.resize_short and short > self.resize_short:
            scale = self.resize_short / short
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            return key, encode_jpeg(cv2.resize(image, size, interpolation=cv2.INTER_AREA), self.quality), label, None
        if data[:3] == b"\xff\xd8\xff":  # already a JPEG: keep the original bytes
            return key, data, label, None
        return key, encode_jpeg(image, self.quality), label, None


def convert(src: Path, out: Path, maxcount: int = 1000, resize_short: Optional[int] = None, quality: int = 95,
            prefix: str = "shard", seed: int = 0, workers: int = 0, progress: bool = True) -> dict:
    classes, items = find_images(src)
    order = np.random.default_rng(seed).permutation(len(items))
    items = [items[i] for i in order]
    load = LoadImage(src, resize_short, quality)
    skipped: list[str] = []

    def samples():
        pool = Pool(workers) if workers > 0 else None
        try:
            results = pool.imap(load, items, chunksize=32) if pool else map(load, items)
            for key, data, label, error in tqdm(results, total=len(items), desc=f"{src.name} -> {out}",
                                                unit="img", disable=not progress):
                if error:
                    skipped.append(error)
                    continue
                yield key, data, label
        finally:
            if pool:
                pool.close()
                pool.join()

    shards = write_shards(samples(), out, prefix=prefix, maxcount=maxcount, quality=quality,
                          extra_manifest={"classes": classes, "source": str(src)})
    # The skip list is complete only once writing is done; classes without readable images still count.
    manifest = json.loads((out / MANIFEST).read_text())
    manifest.update(num_classes=len(classes), skipped=len(skipped), skipped_files=skipped[:1000])
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    manifest["shard_paths"] = [str(p) for p in shards]
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="folder with one subfolder of images per class")
    parser.add_argument("out", type=Path, help="output folder for the shards and manifest.json")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--resize-short", type=int, default=None,
                        help="downscale images whose shorter side is longer than this (re-encodes them)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    parser.add_argument("--prefix", default="shard", help="shard file prefix: PREFIX-000000.tar, ...")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order shuffle")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0: in this process)")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"{args.src} is not a folder")
    if args.maxcount < 1:
        parser.error("--maxcount must be >= 1")
    m = convert(args.src, args.out, args.maxcount, args.resize_short, args.quality, args.prefix, args.seed,
                args.workers)
    print(f"wrote {m['num_samples']} samples of {m['num_classes']} classes into {len(m['shards'])} shards "
          f"under {args.out}; per class: min {min(m['class_counts'].values(), default=0)}, "
          f"max {max(m['class_counts'].values(), default=0)}")
    if m["skipped"]:
        print(f"skipped {m['skipped']} unreadable images:", file=sys.stderr)
        for line in m["skipped_files"][:20]:
            print(f"  {line}", file=sys.stderr)
        if m["skipped"] > 20:
            print(f"  ... and {m['skipped'] - 20} more (listed in {args.out / MANIFEST})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
