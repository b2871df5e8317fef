"""This project's RT-DETR against Hugging Face transformers' `RTDetrForObjectDetection`: training step time
(forward + criterion + backward + AdamW step) and batch-1 inference latency (forward + top-K post-processing),
same timm backbone, same input size, same neck width / queries / decoder layers / denoising groups, same
synthetic batch. Steps of the two detectors are interleaved round by round in one process; medians and the
ratios ours / transformers (time, below 1 = ours faster) are printed with the device.

    python scripts/bench_detection.py                               # CPU, small (about 3 minutes)
    python scripts/bench_detection.py --device cuda --precision fp16 --img-size 640 \\
        --backbone mobilenetv4_conv_small --hidden-dim 256 --ffn-dim 1024 --num-queries 300 \\
        --batch-size 16 --threads 16

Weights are random (nothing is downloaded): step time does not depend on them. Where ours is slower,
`torch.profiler`'s top operators of both are printed (`--profile` prints them always).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.detection.criterion import RTDETRCriterion  # noqa: E402
from distill.detection.postprocess import PostProcessor  # noqa: E402
from distill.detection.rtdetr import build_rtdetr, rtdetr_config  # noqa: E402
from distill.export.hf_rtdetr import hf_detector_config  # noqa: E402

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="mobilenetv4_conv_small_035")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2, help="training batch (inference is batch 1)")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--boxes-per-image", type=int, default=6)
    p.add_argument("--hidden-dim", type=int, default=128, help="neck and decoder width (both detectors)")
    p.add_argument("--ffn-dim", type=int, default=512, help="encoder attention and decoder FFN width")
    p.add_argument("--num-queries", type=int, default=100)
    p.add_argument("--decoder-layers", type=int, default=3)
    p.add_argument("--num-denoising", type=int, default=100)
    p.add_argument("--hf-arch", default="rtdetr", choices=["rtdetr", "rtdetr_v2"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train-rounds", type=int, default=30, help="interleaved rounds; each times one step of each")
    p.add_argument("--infer-rounds", type=int, default=60)
    p.add_argument("--profile", action="store_true", help="print profiler top operators even when ours is faster")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return model


def synthetic_batch(args, device, generator):
    """Normalised-looking images and `boxes_per_image` random boxes (cxcywh in 0..1) per image."""
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator)
    targets = []
    for _ in range(args.batch_size):
        centres = torch.rand(args.boxes_per_image, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(args.boxes_per_image, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(0, args.num_classes, (args.boxes_per_image,), generator=generator)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centres, sizes], 1).to(device)})
    return images.to(device), targets


def build_ours(args):
    cfg = rtdetr_config(args.backbone, args.num_classes, preset="v2_s", hidden_dim=args.hidden_dim,
                        dim_feedforward=args.ffn_dim, num_queries=args.num_queries,
                        num_decoder_layers=args.decoder_layers, num_denoising=args.num_denoising)
    return build_rtdetr(cfg)


def build_hf(args):
    from transformers import RTDetrForObjectDetection, RTDetrV2ForObjectDetection

    # hf_detector_config reads only the model name of a student run
    run = SimpleNamespace(name=args.backbone)
    config = hf_detector_config(
        run, args.hf_arch, args.num_classes, d_model=args.hidden_dim, encoder_hidden_dim=args.hidden_dim,
        decoder_in_channels=[args.hidden_dim] * 3, encoder_ffn_dim=args.ffn_dim, decoder_ffn_dim=args.ffn_dim,
        num_queries=args.num_queries, decoder_layers=args.decoder_layers, num_denoising=args.num_denoising)
    cls = {"rtdetr": RTDetrForObjectDetection, "rtdetr_v2": RTDetrV2ForObjectDetection}[args.hf_arch]
    return cls(config)


class Bench:
    """One detector: a training step and a batch-1 inference call, each returning nothing."""

    def __init__(self, name, model, train_step, infer):
        self.name, self.model, self.train_step, self.infer = name, model, train_step, infer
        self.times = {"train_step": [], "infer": []}


def make_ours(args, device, autocast, images, targets, image1):
    model = build_ours(args).to(device)
    criterion = RTDETRCriterion(args.num_classes)
    post = PostProcessor(args.num_queries)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    sizes = torch.tensor([[args.img_size, args.img_size]], device=device)

    def train_step():
        model.train()
        with autocast():
            outputs = model(images, targets)
            loss = sum(criterion(outputs, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.inference_mode()
    def infer():
        model.eval()
        with autocast():
            post(model(image1), sizes)

    return Bench("ours", model, train_step, infer)


def make_hf(args, device, autocast, images, targets, image1):
    from transformers import RTDetrImageProcessor

    model = build_hf(args).to(device)
    processor = RTDetrImageProcessor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    sizes = [(args.img_size, args.img_size)]

    def train_step():
        model.train()
        with autocast():
            loss = model(pixel_values=images, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.inference_mode()
    def infer():
        model.eval()
        with autocast():
            outputs = model(pixel_values=image1)
        processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes,
                                                use_focal_loss=True)

    return Bench("transformers", model, train_step, infer)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleave(benches, kind, rounds, warmup, device):
    for b in benches:
        for _ in range(warmup):
            getattr(b, kind)()
    for r in range(rounds):
        # alternate who goes first so drift in machine load hits both alike
        for b in (benches if r % 2 == 0 else benches[::-1]):
            b.times[kind].append(timed(getattr(b, kind), device))


def profile_top(bench, kind, device, top=5):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            getattr(bench, kind)()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n{bench.name}, {kind}: top {top} operators by self time (2 calls)")
    print(prof.key_averages().table(sort_by=sort, row_limit=top))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = PRECISIONS[args.precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    generator = torch.Generator().manual_seed(args.seed)
    images, targets = synthetic_batch(args, device, generator)
    image1 = images[:1].clone()

    benches = [make_ours(args, device, autocast, images, targets, image1),
               make_hf(args, device, autocast, images, targets, image1)]
    params = {b.name: sum(p.numel() for p in b.model.parameters()) for b in benches}

    interleave(benches, "train_step", args.train_rounds, args.warmup, device)
    interleave(benches, "infer", args.infer_rounds, args.warmup, device)

    import timm
    import transformers

    ours, hf = benches
    print(f"\ndevice: {device_name(device)}, {args.device}, {torch.get_num_threads()} thread(s) "
          f"of {__import__('os').cpu_count()} cores, {args.precision}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, timm {timm.__version__}")
    print(f"backbone {args.backbone}, {args.img_size} px, train batch {args.batch_size} "
          f"({args.boxes_per_image} boxes/image), width {args.hidden_dim}, FFN {args.ffn_dim}, "
          f"{args.num_queries} queries, {args.decoder_layers} decoder layers, {args.num_denoising} denoising "
          f"queries; transformers arch {args.hf_arch}; {args.train_rounds} train / {args.infer_rounds} "
          f"inference rounds")
    print(f"parameters: ours {params['ours'] / 1e6:.2f} M, transformers {params['transformers'] / 1e6:.2f} M\n")
    # the paired ratio (median over rounds of ours / transformers within a round) is the steadier figure on a
    # shared machine: both halves of a round see the same load
    print("| figure | ours, median (min) | transformers, median (min) | ratio of medians | paired ratio |")
    print("|---|---|---|---|---|")
    ratios = {}
    for kind, label in (("train_step", "train step, ms"), ("infer", "batch-1 latency, ms")):
        a, b = (statistics.median(x.times[kind]) * 1e3 for x in benches)
        paired = statistics.median(x / y for x, y in zip(ours.times[kind], hf.times[kind]))
        ratios[kind] = paired
        print(f"| {label} | {a:.1f} ({min(ours.times[kind]) * 1e3:.1f}) | {b:.1f} ({min(hf.times[kind]) * 1e3:.1f})"
              f" | {a / b:.2f} | {paired:.2f} |")

    for kind in ("train_step", "infer"):
        if args.profile or ratios[kind] > 1.0:
            for b in benches:
                profile_top(b, kind, device)


if __name__ == "__main__":
    main()
