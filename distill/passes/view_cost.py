"""What a stored view costs, for the two ways of keeping offline labels:

- encoded view: the augmented (and mixed) view as JPEG + the top-k record. Training decodes a small JPEG and
  flips it. Storage grows with the replica count.
- replay parameters: the crop box, ops and magnitudes albumentations applied (`save_applied_params`), the
  mixup partner and weight + the top-k record; the source image is kept once. Training must decode the full
  source image, replay the ops and repeat the JPEG round trip (the teacher labelled the decoded JPEG; without
  it the student's pixels differ from the teacher's), i.e. all of online augmentation's CPU work and more.

`measure` reports bytes per view (as stored in tar shards, headers included) and CPU views/s per core of
what training must do per view in each case. The labelling pass stores encoded views: replay saves storage
but multiplies the input pipeline's CPU cost (see scripts/bench_offline.py), and a small student on a GPU
is input-bound already with online augmentation.
"""
from __future__ import annotations

import io
import json
import time
from typing import Sequence

import albumentations as A
import cv2
import numpy as np

from distill.data.augment import create_augment
from distill.data.shards import encode_jpeg
from distill.passes.soft_labels import encode_record
from distill.passes.views import jpeg_round_trip

TAR_BLOCK = 512


def tar_bytes(member_sizes: Sequence[int]) -> int:
    """Bytes of tar members of these sizes: a 512-byte header each, data padded to 512."""
    return sum(TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK for n in member_sizes)


def _rate(fn, items, min_seconds: float = 0.5) -> float:
    """Calls per second of fn over items (cycled until min_seconds have passed)."""
    done, start = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
            done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def measure(images: Sequence[np.ndarray], augment: dict, view_size: int, quality: int = 90, topk: int = 10,
            num_classes: int = 1000, source_quality: int = 90, replicas: int = 1) -> dict:
    """Bytes per view and per-core CPU views/s of the encoded-view and replay options, on these source images
    (HWC uint8) under one source's augmentation (`{"name": preset, **params}`)."""
    spec = dict(augment)
    aug = create_augment(spec.pop("name"), view_size, seed=0, **spec)
    recorder = A.Compose(aug.pipeline.transforms, seed=0, save_applied_params=True)
    record = encode_record(np.full(topk, 1.0 / topk, np.float16), 0, 1.0, num_classes, np.arange(topk))
    cls = b"123"

    sources = [encode_jpeg(im, source_quality) for im in images]
    views = [aug(im).transpose(1, 2, 0) for im in images]
    jpgs = [jpeg_round_trip(v, quality)[0] for v in views]
    params = []
    for im in images:
        applied = recorder(image=im)["applied_transforms"]
        # + the mixup partner (an index into the shard) and weight, as a replay needs them
        params.append(json.dumps({"ops": applied, "partner": 0, "lam": 0.5}, default=str, separators=(",", ":")))

    encoded_tar = np.mean([tar_bytes([len(j), len(cls), len(record)]) for j in jpgs])
    replay_tar = np.mean([tar_bytes([len(p), len(cls), len(record)]) for p in params])
    replay_packed = np.mean([len(p) for p in params]) + len(record)  # one table per shard: no tar overhead
    source_bytes = np.mean([tar_bytes([len(s), len(cls)]) for s in sources])

    def decode(data: bytes) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)

    flip = create_augment("flip", view_size, seed=0)
    read_encoded = _rate(lambda j: flip(decode(j)), jpgs)
    read_replay = _rate(lambda s: jpeg_round_trip(aug(decode(s)).transpose(1, 2, 0), quality), sources)
    read_online = _rate(lambda s: aug(decode(s)), sources)
    return {
        "view_size": view_size,
        "source_size": list(images[0].shape[:2]),
        "encoded_view": {"bytes_per_view": float(encoded_tar), "jpeg_bytes": float(np.mean([len(j) for j in jpgs])),
                         "read_views_per_s_per_core": read_encoded},
        "replay_params": {"bytes_per_view_tar": float(replay_tar), "bytes_per_view_packed": float(replay_packed),
                          "params_json_bytes": float(np.mean([len(p) for p in params])),
                          "source_bytes_per_image": float(source_bytes),
                          "source_bytes_per_view": float(source_bytes) / max(replicas, 1),
                          "read_views_per_s_per_core": read_replay},
        "online_augment": {"read_views_per_s_per_core": read_online},
    }


def format_measure(m: dict, device: str) -> str:
    e, r, o = m["encoded_view"], m["replay_params"], m["online_augment"]
    buf = io.StringIO()
    print(f"[{device}] bytes per view ({m['view_size']} px views of {m['source_size']} px sources, tar shards):", file=buf)
    print(f"  encoded view   : {e['bytes_per_view']:9.0f} B/view (JPEG {e['jpeg_bytes']:.0f} B)   "
          f"training input {e['read_views_per_s_per_core']:8.0f} views/s/core (decode view + flip)", file=buf)
    print(f"  replay params  : {r['bytes_per_view_tar']:9.0f} B/view in tar, {r['bytes_per_view_packed']:.0f} B packed "
          f"(+ source {r['source_bytes_per_view']:.0f} B/view amortised)   "
          f"training input {r['read_views_per_s_per_core']:8.0f} views/s/core (decode source + replay + JPEG round trip)",
          file=buf)
    print(f"  online augment : {'':9s}   training input {o['read_views_per_s_per_core']:8.0f} views/s/core "
          f"(for reference: decode source + augment)", file=buf)
    per_k = {name: 1000 / m[name]["read_views_per_s_per_core"] for name in ("encoded_view", "replay_params")}
    print(f"  CPU cores to feed 1000 student images/s: encoded view {per_k['encoded_view']:.1f}, "
          f"replay {per_k['replay_params']:.1f}; storage per view: encoded {e['bytes_per_view']:.0f} B, "
          f"replay {r['bytes_per_view_packed'] + r['source_bytes_per_view']:.0f} B", file=buf)
    return buf.getvalue()
