"""RT-DETR training augmentation per loader worker: this project's pipeline (`distill.data.coco`, the reference's
definitions with two faster kernels) against the same pipeline built from torchvision's own transforms as
RT-DETRv2's configuration lists them. One process, one thread, images already decoded; rounds interleaved.

    python scripts/bench_det_augment.py                       # 640 x 480 sources, output 640
    python scripts/bench_det_augment.py --src 1024x768 --images 40 --rounds 7
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torchvision import tv_tensors  # noqa: E402
from torchvision.ops import box_convert  # noqa: E402
from torchvision.transforms import v2 as T  # noqa: E402

from distill.data.coco import apply_transform, detection_transform  # noqa: E402


def reference_pipeline(size: int) -> T.Compose:
    return T.Compose([T.RandomPhotometricDistort(p=0.5), T.RandomZoomOut(fill=0),
                      T.RandomApply([T.RandomIoUCrop()], p=0.8), T.SanitizeBoundingBoxes(min_size=1),
                      T.RandomHorizontalFlip(), T.Resize((size, size)), T.SanitizeBoundingBoxes(min_size=1)])


def samples(count: int, width: int, height: int, seed: int = 0):
    """Smooth random images (cheap to make, not flat) with 1-8 boxes of spread sizes each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
        image = np.ascontiguousarray(np.repeat(np.repeat(small, 16, 0), 16, 1))
        n = int(rng.integers(1, 9))
        wh = np.exp(rng.uniform(np.log(8), np.log(0.6 * min(width, height)), (n, 2)))
        xy = rng.uniform(0, 1, (n, 2)) * (np.array([width, height]) - wh)
        out.append((image, np.concatenate([xy, wh], 1).astype(np.float32), np.arange(n)))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", default="640x480", help="source image size, WIDTHxHEIGHT")
    p.add_argument("--size", type=int, default=640, help="output side")
    p.add_argument("--images", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    width, height = (int(v) for v in args.src.split("x"))
    data = samples(args.images, width, height)
    ours, reference = detection_transform(args.size, True, True), reference_pipeline(args.size)

    def run_ours(seed):
        for i, (image, boxes, labels) in enumerate(data):
            apply_transform(ours, image, boxes, labels, seed=seed + i)

    def run_reference(seed):
        for i, (image, boxes, labels) in enumerate(data):
            xyxy = box_convert(torch.as_tensor(boxes), "xywh", "xyxy")
            sample = {"image": tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)),
                      "boxes": tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(height, width)),
                      "labels": torch.as_tensor(labels)}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + i)
                reference(sample)

    rates = {"ours": [], "reference (torchvision)": []}
    run_ours(0), run_reference(0)  # warm-up
    for r in range(args.rounds):
        sides = list(zip(rates, (run_ours, run_reference)))
        for name, fn in (sides if r % 2 == 0 else sides[::-1]):
            start = time.perf_counter()
            fn(1000 * (r + 1))
            rates[name].append(args.images / (time.perf_counter() - start))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.src} sources → {args.size}, strong augmentation, 1 thread; "
          f"median images/s over {args.rounds} rounds")
    for name, value in medians.items():
        print(f"  {name}: {value:.1f}")
    print(f"  ours / reference: {medians['ours'] / medians['reference (torchvision)']:.2f}")
    return medians


if __name__ == "__main__":
    main()
