"""Bytes of one stored view (offline labels) by side and label format: the JPEG of an augmented view of a
photograph at quality 90, and the label record, full distribution against top-k, as they sit in tar shards.

    python scripts/bench_view_bytes.py                       # 224 / 256 / 384 px, 1000 classes, top-10
    python scripts/bench_view_bytes.py --sides 224 --classes 21843 --topk 20

The photographs are scikit-image's sample images (`pip install scikit-image`; the generated shapes dataset
stands in without it, and says so). These figures back the estimate `distill.passes.plan` makes for
`label_views.py dry_run=N`. Sizes only: no timing, so the shared machine does not matter.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.data.augment import create_augment  # noqa: E402
from distill.passes.plan import jpeg_bytes  # noqa: E402
from distill.passes.soft_labels import record_bytes  # noqa: E402
from distill.passes.view_cost import tar_bytes  # noqa: E402
from distill.passes.views import jpeg_round_trip  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field", "immunohistochemistry", "cat")
AUGMENTS = {"D1 (RandAugment m9)": {"name": "inception_randaug", "num_ops": 2, "magnitude": 9},
            "Inception crop (D2 before mixup)": {"name": "inception"}}


def photographs() -> tuple[list[np.ndarray], str]:
    try:
        import skimage.data
    except ImportError:
        from distill.data.synthetic import class_attributes, render_sample

        rng = np.random.default_rng(0)
        attrs = class_attributes(10)
        return [render_sample(i, attrs, 400, rng) for i in range(8)], "generated shapes (scikit-image not installed)"
    images = []
    for name in PHOTOS:
        im = np.asarray(getattr(skimage.data, name)())
        im = np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im[..., :3]
        images.append(im.astype(np.uint8))
    return images, f"scikit-image photographs ({', '.join(PHOTOS)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sides", type=int, nargs="+", default=[224, 256, 384])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--views", type=int, default=20, help="augmented views per photograph")
    p.add_argument("--quality", type=int, default=90)
    args = p.parse_args()

    images, origin = photographs()
    full, topk = record_bytes("full", args.classes), record_bytes("topk", args.classes, args.topk)
    print(f"views of {origin}; JPEG quality {args.quality}; {args.classes} classes; mean over "
          f"{len(images)} x {args.views} views\n")
    print(f"| side | source | JPEG bytes | view, full labels | view, top-{args.topk} | full / top-{args.topk} | "
          f"plan's JPEG estimate |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for side in args.sides:
        for label, spec in AUGMENTS.items():
            spec = dict(spec)
            augment = create_augment(spec.pop("name"), side, seed=0, **spec)
            jpg = float(np.mean([len(jpeg_round_trip(augment(im).transpose(1, 2, 0), args.quality)[0])
                                 for im in images for _ in range(args.views)]))
            cls = len(str(args.classes - 1))
            with_full = tar_bytes([round(jpg), cls, full])
            with_topk = tar_bytes([round(jpg), cls, topk])
            print(f"| {side} | {label} | {jpg:,.0f} | {with_full:,} | {with_topk:,} | {with_full / with_topk:.3f} | "
                  f"{jpeg_bytes(side):,} |")
    print(f"\nlabel record: full {full:,} B ({tar_bytes([full]):,} B in a tar), top-{args.topk} {topk:,} B "
          f"({tar_bytes([topk]):,} B in a tar)")


if __name__ == "__main__":
    main()
