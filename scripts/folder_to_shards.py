"""Convert an image folder into webdataset shards plus manifest.json, in parallel and resumably.

    python scripts/folder_to_shards.py /datasets/imagenet/train /data/imagenet/train
    python scripts/folder_to_shards.py /datasets/imagenet/val /data/imagenet/val \
        --labels /datasets/imagenet/LOC_val_solution.csv --classes /data/imagenet/train/manifest.json

The output folder is what a data mix or `data.val_shards` names, relative to `data.root` (`imagenet/train`,
`imagenet/val` above with data.root=/data): every *.tar in it, in name order.

Two source layouts:
- class folders (ImageFolder): one subfolder per class, images anywhere below it. Classes are the sorted
  subfolder names, numbered as torchvision's ImageFolder numbers them.
- a flat folder with `--labels FILE` (ImageNet validation): FILE gives each image's class name, either as
  `image,class...` / `image class` lines (Kaggle's LOC_val_solution.csv: the first word after the comma; a
  header line is skipped) or as one class name per line for the images in sorted file-name order
  (imagenet_2012_validation_synset_labels.txt). `--classes` (a manifest.json with "classes", or a text file
  with one name per line) numbers them as the training set does; without it, the sorted names of FILE.

The manifest keeps the class names under "classes". Samples are shuffled (seeded) before being cut into
shards of `--maxcount`, so every shard holds a mix of classes, which the loaders need: they split sources
over processes and workers by shard. Shards are written in parallel (`--workers`, all cores by default),
each atomically; an interrupted conversion continues where it stopped when rerun with the same arguments
(progress is kept in OUT/.progress until the manifest is written). JPEG files are stored as they are unless
resized; other formats are re-encoded as JPEG. Unreadable images are skipped and listed.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import sys
from multiprocessing import Pool
from pathlib import Path
from typing import Optional

# cv2, numpy, PIL, webdataset and the package's shard code are imported where they are used: --help and a
# wrong option answer without loading them

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
PROGRESS = ".progress"
MTIME = 0  # fixed tar member time: a shard's bytes depend only on its images


class ConversionError(Exception):
    """A source, label file or output folder that cannot be converted; the message says which and why."""


# --------------------------------------------------------------------------------------------------
# What to convert: (path, label) items and class names
# --------------------------------------------------------------------------------------------------


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def find_class_folders(src: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConversionError(f"{src} has no class subfolders (expected an ImageFolder-style tree, "
                              f"or a flat folder with --labels FILE)")
    return classes, [(path, label) for label, name in enumerate(classes) for path in _images_under(src / name)]


def read_class_names(path: Path) -> list[str]:
    """Class names from a manifest.json ("classes") or a text file with one name per line."""
    if path.suffix == ".json":
        try:
            classes = json.loads(path.read_text()).get("classes")
        except (OSError, ValueError) as exc:
            raise ConversionError(f"--classes {path}: unreadable ({exc})") from None
        if not isinstance(classes, list) or not classes:
            raise ConversionError(f"--classes {path}: no 'classes' list in it")
        return [str(c) for c in classes]
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ConversionError(f"--classes {path}: empty")
    return names


def read_labels(src: Path, labels_file: Path, classes: Optional[list[str]]) -> tuple[list[str], list[tuple[Path, int]]]:
    """Items of a flat folder labelled by `labels_file` (see the module docstring for its formats)."""
    images = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ConversionError(f"{src} holds no images")
    by_stem = {p.stem: p for p in images}
    rows = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
    split = [re.split(r"[,\s]+", row) for row in rows]
    named: dict[str, str] = {}
    if all(len(fields) == 1 for fields in split):  # one class per line, sorted file-name order
        if len(rows) != len(images):
            raise ConversionError(f"--labels {labels_file}: {len(rows)} lines for {len(images)} images in {src} "
                                  f"(a one-column file lists the class of every image in sorted name order)")
        named = {p.stem: row for p, row in zip(images, rows)}
    else:
        for i, fields in enumerate(split):
            if len(fields) < 2:
                raise ConversionError(f"--labels {labels_file} line {i + 1}: expected 'image,class' or "
                                      f"'image class', got {rows[i]!r}")
            stem = Path(fields[0]).stem if Path(fields[0]).suffix.lower() in IMAGE_EXTENSIONS else fields[0]
            if stem not in by_stem:
                if i == 0 and len(fields) >= 2:
                    continue  # a header line (e.g. "ImageId,PredictionString")
                raise ConversionError(f"--labels {labels_file} line {i + 1}: no image {fields[0]!r} in {src}")
            named[stem] = fields[1]
        unlabelled = [p.name for p in images if p.stem not in named]
        if unlabelled:
            raise ConversionError(f"--labels {labels_file}: {len(unlabelled)} images of {src} have no label, "
                                  f"first: {unlabelled[:3]}")
    if classes is None:
        if all(name.isdigit() for name in named.values()):
            raise ConversionError(f"--labels {labels_file}: numeric labels (such as the devkit's ILSVRC2012 ids, "
                                  f"in an order of their own); give class names (wnids), or --classes to number them")
        classes = sorted(set(named.values()))
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({name for name in named.values() if name not in index})
    if unknown:
        raise ConversionError(f"--labels {labels_file}: {len(unknown)} class names not among the {len(classes)} "
                              f"classes, first: {unknown[:3]}")
    return classes, [(by_stem[stem], index[name]) for stem, name in sorted(named.items())]


# --------------------------------------------------------------------------------------------------
# Writing one shard (in a worker process)
# --------------------------------------------------------------------------------------------------


def _decode(data: bytes) -> Optional[np.ndarray]:
    """HWC uint8 RGB, or None. OpenCV first (fast); PIL for what OpenCV does not read (GIF, palettes)."""
    import cv2
    import numpy as np
    from PIL import Image

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is not None:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    try:
        with Image.open(io.BytesIO(data)) as pil:
            return np.asarray(pil.convert("RGB"))
    except Exception:
        return None


class ShardWriter:
    """(shard index, [(path, label), ...]) -> the shard written atomically + its record. Picklable."""

    def __init__(self, src: Path, out: Path, prefix: str, resize_short: Optional[int], quality: int):
        self.src, self.out, self.prefix = src, out, prefix
        self.resize_short, self.quality = resize_short, quality

    def load(self, path: Path) -> tuple[Optional[bytes], Optional[str]]:
        import cv2

        from distill.data.shards import encode_jpeg

        try:
            data = path.read_bytes()
        except OSError as exc:
            return None, f"{path}: {exc}"
        image = _decode(data)
        if image is None:
            return None, f"{path}: not a readable image"
        short = min(image.shape[:2])
        if self.resize_short and short > self.resize_short:
            scale = self.resize_short / short
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            return encode_jpeg(cv2.resize(image, size, interpolation=cv2.INTER_AREA), self.quality), None
        if data[:3] == b"\xff\xd8\xff":  # already a JPEG: keep the original bytes
            return data, None
        return encode_jpeg(image, self.quality), None

    def __call__(self, job: tuple[int, list[tuple[Path, int]]]) -> dict:
        import webdataset as wds

        index, items = job
        name = f"{self.prefix}-{index:06d}.tar"
        tmp = self.out / PROGRESS / (name + ".tmp")
        counts: dict[str, int] = {}
        skipped: list[str] = []
        with open(tmp, "wb") as stream, wds.TarWriter(stream, mtime=MTIME) as sink:
            for path, label in items:
                data, error = self.load(path)
                if error:
                    skipped.append(error)
                    continue
                key = str(path.relative_to(self.src).with_suffix("")).replace(".", "_").replace("/", "__")
                sink.write({"__key__": key, "jpg": data, "cls": str(label).encode()})
                counts[str(label)] = counts.get(str(label), 0) + 1
        record = {"index": index, "name": name, "num_samples": sum(counts.values()), "class_counts": counts,
                  "skipped": skipped}
        if record["num_samples"]:
            os.replace(tmp, self.out / name)
        else:
            tmp.unlink()
        _write_json(self.out / PROGRESS / f"{name}.json", record)  # the shard counts as done from here on
        return record


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------------


def convert(src: Path, out: Path, maxcount: int = 1000, resize_short: Optional[int] = None, quality: int = 95,
            prefix: str = "shard", seed: int = 0, workers: Optional[int] = None, labels: Optional[Path] = None,
            classes_file: Optional[Path] = None, progress: bool = True) -> dict:
    """Write the shards and manifest of `src` into `out` (continuing an interrupted run); the manifest."""
    import numpy as np
    from tqdm import tqdm

    from distill.data.shards import MANIFEST

    given = read_class_names(classes_file) if classes_file else None
    if labels is not None:
        classes, items = read_labels(src, labels, given)
    else:
        classes, items = find_class_folders(src)
        if given is not None and given != classes:
            raise ConversionError(f"--classes {classes_file} does not match the class folders of {src}")
    if not items:
        raise ConversionError(f"{src}: no images found (extensions {sorted(IMAGE_EXTENSIONS)})")
    order = np.random.default_rng(seed).permutation(len(items))
    items = [items[i] for i in order]
    jobs = [(i, items[start:start + maxcount]) for i, start in enumerate(range(0, len(items), maxcount))]

    # Everything that decides the shards' contents: a rerun continues only if all of it is unchanged.
    listing = hashlib.sha256("\n".join(f"{p.relative_to(src)}\t{y}" for p, y in items).encode()).hexdigest()
    plan = {"source": str(src.resolve()), "images": len(items), "listing_sha256": listing, "seed": seed,
            "maxcount": maxcount, "prefix": prefix, "resize_short": resize_short, "quality": quality,
            "classes": classes}
    state = out / PROGRESS
    manifest_path = out / MANIFEST
    if manifest_path.is_file() and not state.is_dir():
        done = json.loads(manifest_path.read_text()).get("conversion")
        if done != plan:
            raise ConversionError(f"{out} already holds a manifest of another conversion; choose an empty folder")
        return json.loads(manifest_path.read_text())
    if state.is_dir():
        before = json.loads((state / "plan.json").read_text()) if (state / "plan.json").is_file() else None
        if before != plan:
            changed = sorted(k for k in plan if (before or {}).get(k) != plan[k])
            raise ConversionError(f"{out} holds an interrupted conversion with other settings ({changed}); "
                                  f"rerun it with the same arguments, or remove {state} to start over")
    else:
        if out.is_dir() and any(out.glob("*.tar")):
            raise ConversionError(f"{out} already holds shards; choose an empty folder")
        state.mkdir(parents=True)
        _write_json(state / "plan.json", plan)

    records = {}
    for path in state.glob("*.tar.json"):
        record = json.loads(path.read_text())
        records[record["index"]] = record
    todo = [job for job in jobs if job[0] not in records]
    writer = ShardWriter(src, out, prefix, resize_short, quality)
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    bar = tqdm(total=len(items), initial=sum(len(jobs[i][1]) for i in records), unit="img", disable=not progress,
               desc=f"{src.name} -> {out}")
    pool = Pool(min(workers, len(todo))) if workers > 0 and len(todo) > 1 else None
    try:
        for record in (pool.imap_unordered(writer, todo) if pool else map(writer, todo)):
            records[record["index"]] = record
            bar.update(len(jobs[record["index"]][1]))
    finally:
        bar.close()
        if pool:
            pool.terminate()
            pool.join()

    ordered = [records[i] for i in range(len(jobs))]
    class_counts: dict[str, int] = {}
    for record in ordered:
        for label, n in record["class_counts"].items():
            class_counts[label] = class_counts.get(label, 0) + n
    skipped = [line for record in ordered for line in record["skipped"]]
    manifest = {
        "num_samples": sum(r["num_samples"] for r in ordered),
        "num_classes": len(classes),
        "class_counts": {k: class_counts[k] for k in sorted(class_counts, key=int)},
        "shards": [{"name": r["name"], "num_samples": r["num_samples"]} for r in ordered if r["num_samples"]],
        "classes": classes,
        "source": str(src),
        "skipped": len(skipped),
        "skipped_files": skipped[:1000],
        "conversion": plan,
    }
    _write_json(manifest_path, manifest)
    shutil.rmtree(state)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="folder with one subfolder of images per class, or flat with --labels")
    parser.add_argument("out", type=Path, help="output folder for the shards and manifest.json")
    parser.add_argument("--labels", type=Path, default=None,
                        help="class of each image of a flat folder (ImageNet validation); see above")
    parser.add_argument("--classes", type=Path, default=None,
                        help="class names in label order: a manifest.json (e.g. the training set's) or a text file")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--resize-short", type=int, default=None,
                        help="downscale images whose shorter side is longer than this (re-encodes them)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    parser.add_argument("--prefix", default="shard", help="shard file prefix: PREFIX-000000.tar, ...")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order shuffle")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes writing shards (default: every core available; 0: in this process)")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"{args.src} is not a folder")
    for flag, path in (("--labels", args.labels), ("--classes", args.classes)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path}: no such file")
    if args.maxcount < 1:
        parser.error("--maxcount must be >= 1")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be >= 0")
    from distill.data.shards import MANIFEST

    try:
        m = convert(args.src, args.out, args.maxcount, args.resize_short, args.quality, args.prefix, args.seed,
                    args.workers, args.labels, args.classes)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
