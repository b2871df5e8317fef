"""Input pipeline throughput per loader worker: our augmentation presets against timm's transforms.

    python scripts/bench_input.py                          # 256 px JPEGs, 224 crops, all presets
    python scripts/bench_input.py --src-size 320 --img-size 256 --images 200 --rounds 7

One process, one thread, no DataLoader: what a single loader worker sustains. Each timed call decodes a
JPEG from bytes held in memory (read once from generated webdataset shards) and augments it:

- ours: `decode_sample` (OpenCV) + `create_augment(preset)` -> CHW uint8 tensor (normalised later, per batch
  on the device);
- timm (float): PIL decode + `timm.data.create_transform(...)`, its default ending ToTensor + Normalize ->
  CHW float32 tensor (4x the bytes to send through the loader);
- timm (uint8): the same transform with `use_prefetcher=True` (timm's own GPU-normalising path) -> CHW
  uint8 tensor (PIL to tensor, no scaling), the output ours produces, so the fairest pairing.

Rounds alternate ours / timm per preset, so drift on a shared machine hits both; medians over rounds.
"""
from __future__ import annotations

import argparse
import io
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import timm
import timm.data
import torch
from PIL import Image

from distill.data.augment import create_augment
from distill.data.shards import SkipCounter, decode_sample, expand_shards, iter_shard
from distill.data.synthetic import generate_classification

# preset name, its parameters, and timm's create_transform arguments of the same strength
PRESETS = {
    "inception_randaug m9 n2": ("inception_randaug", {"num_ops": 2, "magnitude": 9},
                                dict(is_training=True, auto_augment="rand-m9-n2", scale=(0.08, 1.0), hflip=0.5)),
    "inception_randaug m5 n2": ("inception_randaug", {"num_ops": 2, "magnitude": 5},
                                dict(is_training=True, auto_augment="rand-m5-n2", scale=(0.08, 1.0), hflip=0.5)),
    "inception": ("inception", {}, dict(is_training=True, scale=(0.08, 1.0), hflip=0.5, color_jitter=0.0)),
    # a full-image RandomResizedCrop is a resize; timm has no plain resize + flip training transform
    "flip": ("flip", {}, dict(is_training=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5, color_jitter=0.0)),
    "eval": ("eval", {"crop_pct": 0.875}, dict(is_training=False, crop_pct=0.875)),
}


def device_line() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())
    return (f"{cpu}, {torch.get_num_threads()} thread(s) used of {len(__import__('os').sched_getaffinity(0))} "
            f"cores; torch {torch.__version__}, timm {timm.__version__}, OpenCV {cv2.__version__}, "
            f"Pillow {Image.__version__}, Python {platform.python_version()}")


def load_jpegs(src_size: int, count: int, folder: Path) -> list[bytes]:
    """JPEG samples from generated shards (learnable shapes and textures, not noise), kept as raw samples."""
    per_class = max(1, -(-count // 10))
    generate_classification(folder, num_classes=10, train_per_class=per_class, val_per_class=0,
                            img_size=src_size, seed=0, shard_size=200)
    samples = [s for url in expand_shards("train", folder) for s in iter_shard(url, SkipCounter())]
    return samples[:count]


def ours(samples, preset, params, img_size):
    augment = create_augment(preset, img_size, seed=0, **params)

    def run():
        for sample in samples:
            image, _ = decode_sample(sample)
            out = torch.from_numpy(augment(image))
        return out

    return run


def theirs(samples, kwargs, img_size, uint8):
    transform = timm.data.create_transform(img_size, use_prefetcher=uint8, **kwargs)

    def run():
        for sample in samples:
            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            out = transform(image)
            if isinstance(out, np.ndarray):  # older timm prefetch paths end in ToNumpy
                out = torch.from_numpy(out)
        return out

    return run


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src-size", type=int, default=256, help="side of the generated source JPEGs")
    ap.add_argument("--img-size", type=int, default=224, help="output crop side")
    ap.add_argument("--images", type=int, default=100, help="images per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating A/B rounds per pipeline (median reported)")
    ap.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenCV threads (1 = one loader worker)")
    ap.add_argument("--data", type=Path, default=None, help="folder for the generated shards (default: a temp dir)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        samples = load_jpegs(args.src_size, args.images, args.data or Path(tmp))
    print(f"device: {device_line()}")
    print(f"{len(samples)} JPEGs of {args.src_size}x{args.src_size} -> {args.img_size}x{args.img_size}, "
          f"{args.rounds} alternating rounds, median images/s")
    print("| preset | ours (uint8) img/s | timm uint8 img/s | timm float img/s | ours / timm uint8 | ours / timm float |")
    print("|---|---:|---:|---:|---:|---:|")
    for label in args.presets:
        preset, params, kwargs = PRESETS[label]
        runs = {"ours": ours(samples, preset, params, args.img_size),
                "timm_u8": theirs(samples, kwargs, args.img_size, uint8=True),
                "timm_f32": theirs(samples, kwargs, args.img_size, uint8=False)}
        for fn in runs.values():  # warm-up: first calls build caches, import lazily
            fn()
        times = {k: [] for k in runs}
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for k in order:
                times[k].append(timed(runs[k]))
        rate = {k: len(samples) / statistics.median(v) for k, v in times.items()}
        print(f"| {label} | {rate['ours']:.0f} | {rate['timm_u8']:.0f} | {rate['timm_f32']:.0f} | "
              f"{rate['ours'] / rate['timm_u8']:.2f} | {rate['ours'] / rate['timm_f32']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
