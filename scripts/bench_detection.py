"""This project's RT-DETR against Hugging Face transformers' `RTDetrV2ForObjectDetection`, same detector:
training step time (forward + criterion + backward + AdamW step) and batch-1 latency (forward + top-K
post-processing), in PyTorch and in onnxruntime. The transformers model is built from ours
(`distill.detection.hf_convert.to_transformers`): same timm backbone, neck, decoder and weights. The sides
are interleaved round by round in one process; medians and the paired ratios ours / transformers (time,
below 1 = ours faster) are printed with the device.

    python scripts/bench_detection.py                               # CPU, small (a few minutes)
    python scripts/bench_detection.py --img-size 640 --backbone mobilenetv4_conv_small --hidden-dim 256 \\
        --ffn-dim 1024 --num-queries 300 --train-rounds 0 --onnx    # the v2-S size, latency only
    python scripts/bench_detection.py --device cuda --precision bf16 --img-size 640 \\
        --backbone mobilenetv4_conv_small --hidden-dim 256 --ffn-dim 1024 --num-queries 300 --batch-size 16

Latency is measured on the deploy form of ours (`distill.detection.deploy`: RepVGG fused, batch norms
folded), as an inference user runs it; transformers has no such form. Weights are random (nothing is
downloaded): time does not depend on them. For another script (one GPU benchmark of everything):

    from bench_detection import DetectorSizes, latency_times, train_step_times, summarise
    summarise(train_step_times(DetectorSizes(...), torch.device("cuda"), 640, torch.bfloat16, batch_size=16))
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.finetune_det import fp32  # noqa: E402
from distill.detection.criterion import RTDETRCriterion  # noqa: E402
from distill.detection.postprocess import PostProcessor  # noqa: E402
from distill.detection.rtdetr import build_rtdetr, rtdetr_config  # noqa: E402

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
TRANSFORMERS = "transformers"


@dataclass
class DetectorSizes:
    """The detector both sides build (v2-S neck and decoder at these widths)."""

    backbone: str = "mobilenetv4_conv_small_035"
    num_classes: int = 80
    hidden_dim: int = 128
    ffn_dim: int = 512
    num_queries: int = 100
    decoder_layers: int = 3
    num_denoising: int = 100


def build_pair(sizes: DetectorSizes, seed: int = 0):
    """(ours, transformers') with the same configuration and the same weights, in training form."""
    from distill.detection.hf_convert import to_transformers

    torch.manual_seed(seed)
    ours = build_rtdetr(rtdetr_config(sizes.backbone, sizes.num_classes, preset="v2_s", hidden_dim=sizes.hidden_dim,
                                      dim_feedforward=sizes.ffn_dim, num_queries=sizes.num_queries,
                                      num_decoder_layers=sizes.decoder_layers, num_denoising=sizes.num_denoising))
    theirs = to_transformers(ours, [f"class_{i}" for i in range(sizes.num_classes)])
    return ours, theirs


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleave(calls: dict[str, Callable[[], None]], rounds: int, warmup: int, device: torch.device
               ) -> dict[str, list[float]]:
    """Seconds per call of each side, the sides alternating their order round by round (machine load hits
    all alike)."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(_timed(calls[name], device))
    return times


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else nullcontext


def synthetic_batch(batch_size: int, img_size: int, num_classes: int, boxes_per_image: int, device, seed: int = 0):
    """Normalised-looking images and random boxes (cxcywh in 0..1) per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=g)
    targets = []
    for _ in range(batch_size):
        centres = torch.rand(boxes_per_image, 2, generator=g) * 0.6 + 0.2
        box_sizes = torch.rand(boxes_per_image, 2, generator=g) * 0.3 + 0.05
        labels = torch.randint(0, num_classes, (boxes_per_image,), generator=g)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centres, box_sizes], 1).to(device)})
    return images.to(device), targets


def train_step_times(sizes: DetectorSizes, device: torch.device, img_size: int, dtype: Optional[torch.dtype] = None,
                     batch_size: int = 2, boxes_per_image: int = 6, rounds: int = 30, warmup: int = 2,
                     seed: int = 0) -> dict[str, list[float]]:
    """Seconds per training step (forward, loss, backward, AdamW), ours and transformers', interleaved."""
    ours, theirs = (m.to(device).train() for m in build_pair(sizes, seed))
    autocast = _autocast(device, dtype)
    images, targets = synthetic_batch(batch_size, img_size, sizes.num_classes, boxes_per_image, device, seed)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    criterion = RTDETRCriterion(sizes.num_classes)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=1e-4) for m in (ours, theirs)]

    def step_ours():
        with autocast():
            outputs = ours(images, targets)
        loss = sum(criterion(fp32(outputs), targets).values())
        optimizers[0].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[0].step()

    def step_theirs():
        with autocast():
            loss = theirs(pixel_values=images, labels=labels).loss
        optimizers[1].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[1].step()

    return interleave({"ours": step_ours, TRANSFORMERS: step_theirs}, rounds, warmup, device)


def latency_callables(ours, theirs, img_size: int, device: torch.device, dtype: Optional[torch.dtype] = None,
                      onnx: bool = False, threads: Optional[int] = None) -> dict[str, Callable[[], None]]:
    """Batch-1 inference calls: [0, 1] image → normalise → detector → top-K detections in pixels.

    `ours` goes in its deploy form; `theirs` (transformers', or None) as it is. With `onnx`, both are also
    exported (TorchScript exporter, opset 17) and run in onnxruntime on the CPU."""
    from transformers import RTDetrImageProcessor

    from distill.detection.deploy import deploy_form
    from distill.export.onnx_detector import ExportedDetector

    num_top = ours.cfg.num_queries
    ours = deploy_form(ours.eval()).to(device)
    wrapped = ExportedDetector(ours, ours.mean, ours.std, num_top).to(device).eval()
    processor = RTDetrImageProcessor(image_mean=list(ours.mean), image_std=list(ours.std))
    mean = torch.tensor(ours.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(ours.std, device=device).view(1, 3, 1, 1)
    image = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
    sizes = torch.tensor([[img_size, img_size]], dtype=torch.float32, device=device)
    autocast = _autocast(device, dtype)

    @torch.inference_mode()
    def run_ours():
        with autocast():
            wrapped(image, sizes)

    @torch.inference_mode()
    def run_theirs():
        with autocast():
            outputs = theirs(pixel_values=(image - mean) / std)
        processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes.flip(1))

    calls = {"ours": run_ours}
    if theirs is not None:
        theirs = theirs.eval().to(device)
        calls[TRANSFORMERS] = run_theirs
    if onnx:
        calls |= onnx_callables(wrapped.cpu(), theirs.cpu() if theirs is not None else None, img_size, threads)
        wrapped.to(device)
        if theirs is not None:
            theirs.to(device)
    return calls


class _HFOutputs(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        outputs = self.model(pixel_values=pixel_values)
        return outputs.logits, outputs.pred_boxes


def onnx_callables(wrapped, theirs, img_size: int, threads: Optional[int] = None) -> dict[str, Callable[[], None]]:
    """Both detectors exported to ONNX and run in onnxruntime (CPU); transformers' post-processing stays in
    PyTorch as its users run it."""
    import tempfile

    import numpy as np
    import onnxruntime as ort
    from transformers import RTDetrImageProcessor
    from transformers.models.rt_detr_v2.modeling_rt_detr_v2 import RTDetrV2ObjectDetectionOutput

    folder = Path(tempfile.mkdtemp(prefix="bench-det-onnx-"))
    image = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[img_size, img_size]], dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (image, sizes), str(folder / "ours.onnx"), dynamo=False, opset_version=17,
                          input_names=["images", "orig_sizes"])
        if theirs is not None:
            torch.onnx.export(_HFOutputs(theirs), (image,), str(folder / "transformers.onnx"), dynamo=False,
                              opset_version=17, input_names=["pixel_values"])
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    ours_session = ort.InferenceSession(str(folder / "ours.onnx"), options, providers=["CPUExecutionProvider"])
    processor = RTDetrImageProcessor()
    mean, std = wrapped.mean.cpu(), wrapped.std.cpu()
    feeds = {"images": image.numpy(), "orig_sizes": sizes.numpy()}
    pixels = {"pixel_values": ((image - mean) / std).numpy().astype(np.float32)}

    def run_ours():
        ours_session.run(None, feeds)

    calls = {"ours, onnxruntime": run_ours}
    if theirs is not None:
        their_session = ort.InferenceSession(str(folder / "transformers.onnx"), options,
                                             providers=["CPUExecutionProvider"])

        def run_theirs():
            logits, boxes = their_session.run(None, pixels)
            outputs = RTDetrV2ObjectDetectionOutput(logits=torch.from_numpy(logits), pred_boxes=torch.from_numpy(boxes))
            processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes.flip(1))

        calls[f"{TRANSFORMERS}, onnxruntime"] = run_theirs
    return calls


def latency_times(sizes: DetectorSizes, device: torch.device, img_size: int, dtype: Optional[torch.dtype] = None,
                  rounds: int = 60, warmup: int = 3, onnx: bool = False, threads: Optional[int] = None,
                  seed: int = 0) -> dict[str, list[float]]:
    """Seconds per batch-1 inference (ours in its deploy form), ours and transformers', interleaved; with
    `onnx` also both in onnxruntime."""
    ours, theirs = build_pair(sizes, seed)
    return interleave(latency_callables(ours, theirs, img_size, device, dtype, onnx, threads), rounds, warmup, device)


def summarise(times: dict[str, list[float]]) -> dict[str, dict]:
    """Per side: median and min in ms, and the paired ratio to transformers in the same runtime (the median
    over rounds of the ratio within a round: steadier on a shared machine than the ratio of medians)."""
    out = {}
    for name, values in times.items():
        row = {"median_ms": statistics.median(values) * 1e3, "min_ms": min(values) * 1e3}
        reference = name.replace("ours", TRANSFORMERS)
        if name.startswith("ours") and reference in times:
            row["paired_ratio"] = statistics.median(a / b for a, b in zip(values, times[reference]))
            row["ratio_of_medians"] = statistics.median(values) / statistics.median(times[reference])
        out[name] = row
    return out


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


def markdown(summary: dict[str, dict], label: str) -> list[str]:
    lines = []
    for name, row in summary.items():
        ratio = f"{row['ratio_of_medians']:.2f} | {row['paired_ratio']:.2f}" if "paired_ratio" in row else "- | -"
        lines.append(f"| {label}, {name} | {row['median_ms']:.1f} ({row['min_ms']:.1f}) | {ratio} |")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(DetectorSizes):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2, help="training batch (inference is batch 1)")
    p.add_argument("--boxes-per-image", type=int, default=6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--train-rounds", type=int, default=30, help="interleaved rounds; each times one step of each")
    p.add_argument("--infer-rounds", type=int, default=60)
    p.add_argument("--onnx", action="store_true", help="latency in onnxruntime too (CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), PRECISIONS[args.precision]
    sizes = DetectorSizes(**{f.name: getattr(args, f.name) for f in fields(DetectorSizes)})
    results = {}
    if args.train_rounds:
        results["train step"] = summarise(train_step_times(sizes, device, args.img_size, dtype, args.batch_size,
                                                           args.boxes_per_image, args.train_rounds, args.warmup,
                                                           args.seed))
    if args.infer_rounds:
        results["batch-1 latency"] = summarise(latency_times(sizes, device, args.img_size, dtype, args.infer_rounds,
                                                             args.warmup, args.onnx, args.threads, args.seed))
    import timm
    import transformers

    print(f"\ndevice: {device_name(device)}, {args.device}, {torch.get_num_threads()} thread(s) of {os.cpu_count()}"
          f" cores, {args.precision}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"timm {timm.__version__}")
    print(f"{sizes}, {args.img_size} px, train batch {args.batch_size} ({args.boxes_per_image} boxes/image); "
          f"{args.train_rounds} train / {args.infer_rounds} inference rounds\n")
    print("| figure, side | ms, median (min) | ratio of medians | paired ratio |")
    print("|---|---|---|---|")
    for label, summary in results.items():
        print("\n".join(markdown(summary, label)))
    return results


if __name__ == "__main__":
    main()
