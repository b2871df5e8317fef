"""Input pipeline throughput per loader worker: our augmentation presets against timm's transforms.

    python scripts/bench_input.py                                  # real photographs, 224 crops, all presets
    python scripts/bench_input.py --images 64 --rounds 7 --presets "inception_randaug_tf m9 n2" inception
    python scripts/bench_input.py --source synthetic --src-size 256  # generated 256 px shapes instead

One process, one thread, no DataLoader: what a single loader worker sustains. Each timed call turns JPEG
bytes held in memory into a 224 x 224 view:

- ours, bytes in: `augment.reseed(i)` then `augment(jpeg_bytes)`: the preset plans its crop on the JPEG
  header and decodes at the scale the crop needs (`distill.data.shards.decode_augmented`) -> CHW uint8;
- ours, pixels in: `decode_sample` (the whole image) then `augment(image)`, the two-step form;
- timm uint8: PIL decode + `timm.data.create_transform(..., use_prefetcher=True)` -> CHW uint8 tensor
  (timm's own GPU-normalising path), the output ours produces, so the fairest pairing;
- timm float: the same with timm's default ending ToTensor + Normalize -> CHW float32 (4x the bytes).
The decode-only ceiling is our full-image decode alone (`decode_rgb`): ours can exceed it only where the crop
allows a reduced-scale decode.

Photographs: scikit-image's bundled colour photographs (astronaut, cat, coffee, Hubble deep field, rocket,
motorcycle pair, immunohistochemistry), cut and resized to ImageNet-like sizes (500x375, 375x500, 500x333,
..., mean about 400 x 350) and JPEG-encoded at --quality (4:2:0). The `flip` preset reads stored views
(the photographs at 224 x 224, quality 90), as offline training does.

Rounds alternate the pipelines per preset, so drift on a shared machine hits all; each round is timed in
CPU seconds of this process (images per CPU-second = per core), medians over rounds.
"""
from __future__ import annotations

import argparse
import io
import os
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
from distill.data.decode import decode_rgb
from distill.data.shards import SkipCounter, decode_sample, expand_shards, iter_shard

# label: preset name, its parameters, timm's create_transform arguments of the same strength, input
PRESETS = {
    "inception_randaug_tf m9 n2": ("inception_randaug_tf", {"num_ops": 2, "magnitude": 9},
                                   dict(is_training=True, auto_augment="rand-m9-n2", scale=(0.08, 1.0), hflip=0.5),
                                   "photos"),
    "inception_randaug_tf m5 n2": ("inception_randaug_tf", {"num_ops": 2, "magnitude": 5},
                                   dict(is_training=True, auto_augment="rand-m5-n2", scale=(0.08, 1.0), hflip=0.5),
                                   "photos"),
    "inception_randaug m9 n2": ("inception_randaug", {"num_ops": 2, "magnitude": 9},
                                dict(is_training=True, auto_augment="rand-m9-n2", scale=(0.08, 1.0), hflip=0.5),
                                "photos"),
    "inception": ("inception", {}, dict(is_training=True, scale=(0.08, 1.0), hflip=0.5, color_jitter=0.0), "photos"),
    # a full-image RandomResizedCrop is a resize; timm has no plain resize + flip training transform
    "flip": ("flip", {}, dict(is_training=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5, color_jitter=0.0),
             "views"),
    "eval": ("eval", {"crop_pct": 0.875}, dict(is_training=False, crop_pct=0.875), "photos"),
}

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "rocket.jpg",
          "motorcycle_left.png", "motorcycle_right.png", "ihc.png"]
SIZES = [(500, 375), (375, 500), (500, 333), (400, 300), (300, 400), (500, 400), (320, 240), (360, 270)]  # (w, h)


def device_line() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())
    import simplejpeg
    return (f"{cpu}, {torch.get_num_threads()} thread(s) used of {len(os.sched_getaffinity(0))} cores; "
            f"torch {torch.__version__}, timm {timm.__version__}, OpenCV {cv2.__version__}, "
            f"simplejpeg {simplejpeg.__version__}, Pillow {Image.__version__}, Python {platform.python_version()}")


def photographs(count: int, quality: int, seed: int = 0) -> list[bytes]:
    """JPEGs of real photographs at ImageNet-like sizes: a random region of each source photograph with the
    target's aspect ratio, resized (area) to the target size."""
    from skimage import data as skdata

    folder = Path(skdata.__file__).parent
    sources = [cv2.imread(str(folder / name), cv2.IMREAD_COLOR) for name in PHOTOS]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        src = sources[i % len(sources)]
        w, h = SIZES[(i // len(sources)) % len(SIZES)]
        scale = min(src.shape[1] / w, src.shape[0] / h) * rng.uniform(0.7, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        x, y = rng.integers(0, src.shape[1] - cw + 1), rng.integers(0, src.shape[0] - ch + 1)
        image = cv2.resize(src[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_AREA)
        out.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes())
    return out


def synthetic(src_size: int, count: int) -> list[bytes]:
    """JPEGs from generated shards (learnable shapes and textures, not noise)."""
    from distill.data.synthetic import generate_classification

    with tempfile.TemporaryDirectory() as tmp:
        generate_classification(Path(tmp), num_classes=10, train_per_class=max(1, -(-count // 10)),
                                val_per_class=0, img_size=src_size, seed=0, shard_size=200)
        samples = [s for url in expand_shards("train", tmp) for s in iter_shard(url, SkipCounter())]
    return [s["jpg"] for s in samples[:count]]


def views(jpegs: list[bytes], size: int) -> list[bytes]:
    """Stored-view-like JPEGs: each image resized to size x size, quality 90."""
    return [cv2.imencode(".jpg", cv2.resize(cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR), (size, size),
                                            interpolation=cv2.INTER_AREA), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
            for j in jpegs]


def pipelines(jpegs, preset, params, kwargs, img_size):
    augment = create_augment(preset, img_size, seed=0, **params)

    def ours_bytes():
        for i, data in enumerate(jpegs):
            augment.reseed(i)
            out = torch.from_numpy(augment(data))
        return out

    def ours_pixels():
        for i, data in enumerate(jpegs):
            augment.reseed(i)
            image, _ = decode_sample({"jpg": data, "cls": b"0"})
            out = torch.from_numpy(augment(image))
        return out

    def timm_run(uint8):
        transform = timm.data.create_transform(img_size, use_prefetcher=uint8, **kwargs)

        def run():
            for data in jpegs:
                out = transform(Image.open(io.BytesIO(data)).convert("RGB"))
                if isinstance(out, np.ndarray):  # older timm prefetch paths end in ToNumpy
                    out = torch.from_numpy(out)
            return out

        return run

    def decode_only():
        for data in jpegs:
            decode_rgb(data)

    return {"ours": ours_bytes, "ours_px": ours_pixels, "timm_u8": timm_run(True), "timm_f32": timm_run(False),
            "decode": decode_only}


def timed(fn) -> float:
    """CPU seconds of this process (all its threads): per-core cost, steady on a machine shared with other
    jobs, where wall time also counts the time this process waits for a core."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def reseed_cost(rounds: int = 20000) -> dict[str, float]:
    """µs per Augment.reseed for a planned preset and the albumentations one."""
    out = {}
    for name in ("inception_randaug_tf", "inception_randaug"):
        augment = create_augment(name, 224, seed=0)
        start = time.process_time()
        for i in range(rounds):
            augment.reseed(i)
        out[name] = (time.process_time() - start) / rounds * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=["photos", "synthetic"], default="photos")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the photographs")
    ap.add_argument("--src-size", type=int, default=256, help="side of the generated JPEGs (--source synthetic)")
    ap.add_argument("--img-size", type=int, default=224, help="output crop side")
    ap.add_argument("--images", type=int, default=64, help="images per timed round")
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds per pipeline (median reported)")
    ap.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenCV threads (1 = one loader worker)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    if args.source == "photos":
        inputs = {"photos": photographs(args.images, args.quality)}
    else:
        inputs = {"photos": synthetic(args.src_size, args.images)}
    inputs["views"] = views(inputs["photos"], args.img_size)
    shapes = np.array([decode_rgb(j).shape[:2] for j in inputs["photos"]])
    bpp = np.mean([len(j) / (h * w) for j, (h, w) in zip(inputs["photos"], shapes)])
    print(f"device: {device_line()}")
    print(f"{len(inputs['photos'])} {'photographs' if args.source == 'photos' else 'generated images'}, mean "
          f"{shapes[:, 1].mean():.0f} x {shapes[:, 0].mean():.0f} px (w x h), {bpp:.2f} JPEG bytes per pixel "
          f"-> {args.img_size} x {args.img_size}; {args.rounds} alternating rounds, median images per CPU-second")
    print("reseed per call: " + ", ".join(f"{k} {v:.1f} µs" for k, v in reseed_cost().items()))
    print("| preset | ours, bytes in | ours, pixels in | timm uint8 | timm float | ours / timm uint8 "
          "| ours / timm float | decode-only / timm uint8 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label in args.presets:
        preset, params, kwargs, kind = PRESETS[label]
        jpegs = inputs[kind]
        runs = pipelines(jpegs, preset, params, kwargs, args.img_size)
        for fn in runs.values():  # warm-up: first calls build caches, import lazily
            fn()
        times = {k: [] for k in runs}
        for r in range(args.rounds):
            for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                times[k].append(timed(runs[k]))
        rate = {k: len(jpegs) / statistics.median(v) for k, v in times.items()}
        print(f"| {label}{' (stored views)' if kind == 'views' else ''} | {rate['ours']:.0f} | {rate['ours_px']:.0f} "
              f"| {rate['timm_u8']:.0f} | {rate['timm_f32']:.0f} | {rate['ours'] / rate['timm_u8']:.2f} "
              f"| {rate['ours'] / rate['timm_f32']:.2f} | {rate['decode'] / rate['timm_u8']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
