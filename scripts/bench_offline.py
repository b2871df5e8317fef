"""Offline teacher labels vs an online teacher: student training steps/s side by side (same student, same
batch, one run), labelling throughput, and bytes per view of stored views vs replay parameters.

Small settings (the defaults) run on a CPU in a few minutes on generated data; full-size settings for a GPU:

    python scripts/bench_offline.py                                  # CPU, small
    python scripts/bench_offline.py --student mobilenetv4_conv_small --teacher tf_efficientnet_l2 \\
        --teacher-img-size 475 --img-size 224 --source-size 288 --batch-size 256 --num-workers 16 \\
        --classes 100 --per-class 100 --steps 50

Weights are random (nothing is downloaded): throughput does not depend on them. Each figure is printed with
the device it was measured on.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.data.loader import build_train_loader  # noqa: E402
from distill.data.mix import DataMix  # noqa: E402
from distill.data.mixup import mixup_batch  # noqa: E402
from distill.data.synthetic import class_attributes, generate_classification, render_sample  # noqa: E402
from distill.engine.logging import make_accelerator  # noqa: E402
from distill.engine.optim import build_optimizer  # noqa: E402
from distill.label_views import plan_units  # noqa: E402
from distill.losses import distillation_loss, soften, stored_targets  # noqa: E402
from distill.models.factory import create_model, input_spec  # noqa: E402
from distill.models.teacher import InputAdapter, create_teacher  # noqa: E402
from distill.passes.labelling import label_units  # noqa: E402
from distill.passes.offline_mix import offline_mix, write_mix, write_source_manifests  # noqa: E402
from distill.passes.view_cost import format_measure, measure  # noqa: E402
from distill.passes.view_writer import LabelRecords  # noqa: E402
from distill.passes.views import ViewRender  # noqa: E402

MIX = """
sources:
  randaug: {shards: data/train, augment: {name: inception_randaug, num_ops: 2, magnitude: 9}, weight: 1}
  mixup: {shards: data/train, augment: {name: inception}, mixup: true, weight: 1}
"""


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="mobilenetv4_conv_small_035")
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--teacher-img-size", type=int, default=None, help="the teacher resizes the view to this side")
    p.add_argument("--img-size", type=int, default=64, help="view / student side")
    p.add_argument("--source-size", type=int, default=80, help="side of the generated source images")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=30, help="training images per class")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="online and offline alternate this many times")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--precision", default="auto")
    p.add_argument("--cost-view-size", type=int, default=224)
    p.add_argument("--cost-source-size", type=int, default=384)
    p.add_argument("--cost-replicas", type=int, default=500, help="for the amortised source bytes of replay")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = p.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_offline_"))
    accelerator = make_accelerator(args.precision, 1, work / "run", trackers=[])
    device = accelerator.device
    where = describe(device)
    torch.manual_seed(0)

    # ---- data, teacher -----------------------------------------------------------------------------
    if not (work / "data" / "train" / "manifest.json").exists():
        generate_classification(work / "data", num_classes=args.classes, train_per_class=args.per_class,
                                val_per_class=1, img_size=args.source_size, seed=0,
                                shard_size=max(16, args.classes * args.per_class // 8))
    (work / "mix.yaml").write_text(MIX)
    mix = DataMix.load(work / "mix.yaml", work)
    teacher = create_teacher(args.teacher, False, None, args.classes, args.teacher_img_size).to(device)

    # ---- labelling throughput ----------------------------------------------------------------------
    out = work / "offline"
    units = plan_units(mix, mix.source_names, {s: args.replicas for s in mix.source_names})
    done = LabelRecords.finished(out)
    render = ViewRender({s.name: s.augment for s in mix.sources}, {s.name: s.mixup for s in mix.sources},
                        args.img_size, 90, args.batch_size, 0)
    stats = label_units([u for u in units if u.name not in done], render, teacher, accelerator, out,
                        LabelRecords(out, 0), 10 if args.classes >= 10 else args.classes, args.classes,
                        args.num_workers, targets="topk")
    records = LabelRecords.finished(out)
    write_source_manifests(out, records, mix.source_names, args.classes, {})
    write_mix(out / "mix.yaml", offline_mix(mix, mix.source_names, out, work))
    offline = DataMix.load(out / "mix.yaml", work)
    views = sum(r["views"] for r in records.values())
    stored = sum(r["bytes"] for r in records.values())

    # ---- student steps/s, online teacher vs offline labels, interleaved in one run ----------------
    student = create_model(args.student, num_classes=args.classes)
    prepare = InputAdapter(input_spec(student)).to(device)
    optimizer = build_optimizer(student, 1e-3, 0.01)
    student, optimizer = accelerator.prepare(student, optimizer)
    student.train()
    total = (args.warmup + args.steps) * args.rounds * args.batch_size
    loaders = {
        "online": iter(build_train_loader(mix, args.img_size, args.batch_size, args.num_workers, 0, total)),
        "offline": iter(build_train_loader(offline, args.img_size, args.batch_size, args.num_workers, 0, total,
                                           soft_labels=True)),
    }
    flags = {"online": torch.tensor(mix.mixup_flags, device=device),
             "offline": torch.tensor(offline.mixup_flags, device=device)}

    def step(mode: str, batch: dict):
        images = batch["image"].to(device, non_blocking=True).float().div_(255)
        labels = batch["label"].to(device, non_blocking=True)
        images, partner, lam = mixup_batch(images, flags[mode][batch["source"].to(device)])
        partner_labels = labels[partner]
        with accelerator.autocast():
            if mode == "online":
                targets = soften(teacher(images))
            else:
                targets, partner_labels, lam = stored_targets(batch, args.classes, 1.0, device)
            logits = student(prepare(images))
        loss = distillation_loss(logits, targets, labels, partner_labels, lam)["loss"]
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = {"online": 0.0, "offline": 0.0}
    input_seconds = {"online": 0.0, "offline": 0.0}
    for _ in range(args.rounds):
        for mode, loader in loaders.items():
            for _ in range(args.warmup):
                step(mode, next(loader))
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                t = time.perf_counter()
                batch = next(loader)
                input_seconds[mode] += time.perf_counter() - t
                step(mode, batch)
            sync(device)
            seconds[mode] += time.perf_counter() - start
    rate = {m: args.steps * args.rounds / s for m, s in seconds.items()}
    waiting = {m: input_seconds[m] / seconds[m] for m in seconds}

    # ---- bytes per view: encoded view vs replay parameters ------------------------------------------
    rng = np.random.default_rng(0)
    attrs = class_attributes(min(args.classes, 56))
    images = [render_sample(i % len(attrs), attrs, args.cost_source_size, rng) for i in range(24)]
    cost = measure(images, mix.sources[0].augment, args.cost_view_size, replicas=args.cost_replicas,
                   num_classes=1000, topk=10)

    print()
    print(f"student {args.student}, teacher {args.teacher}, batch {args.batch_size}, {args.img_size} px, "
          f"{args.num_workers} loader workers")
    print(f"[{where}] student steps/s   online teacher {rate['online']:8.2f}   offline labels {rate['offline']:8.2f}"
          f"   offline/online = {rate['offline'] / rate['online']:.2f}x")
    print(f"[{where}] time waiting for input   online {100 * waiting['online']:5.1f}%   "
          f"offline {100 * waiting['offline']:5.1f}%")
    print(f"[{where}] labelling throughput {stats['views'] / max(stats['seconds'], 1e-9):8.1f} views/s "
          f"({stats['views']} views, teacher {args.teacher}, {args.num_workers} workers)")
    print(f"[{where}] stored views: {stored / max(views, 1):.0f} B/view at {args.img_size} px "
          f"(JPEG q90 + cls + top-10 record, tar headers included)")
    print(format_measure(cost, f"cpu, {torch.get_num_threads()} threads").rstrip())


if __name__ == "__main__":
    main()
