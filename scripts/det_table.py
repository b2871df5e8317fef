"""One table of lightweight backbones inside RT-DETR: parameters, GFLOPs, batch-1 latency and AP.

    python scripts/det_table.py                                   # every variant, 640 px, the best device here
    python scripts/det_table.py --variants mnv4_conv_small,shufflenet_v2_x1_0 --iters 3 --warmup 1
    python scripts/det_table.py --runs runs/rtdetr_mnv4_conv_s runs/rtdetr_repvit_m1_1 --out det_table.md

Every variant gets the same neck and decoder (the recipe's, default `rtdetr_base`: RT-DETRv2-S sized) with
random weights and 80 classes. GFLOPs are 2 x multiply-accumulates as counted by
`torch.utils.flop_counter.FlopCounterMode`; the deformable attention's `grid_sample` is not counted.
Latency is the median forward pass at batch 1 (no post-processing): fp16 on a GPU, fp32 on the CPU, and
the device is named in the output. AP (COCO box AP, in percent) comes from the `summary.json` of the run
folders given with `--runs`, matched to a variant by backbone name. The default measures the weights in
their training form (as the reference sizes are given); `--reparameterize` folds the RepVGG / RepViT
branches first, the form a deployment runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from distill.detection.recipe import load_det_config
from distill.detection.rtdetr import RTDETRConfig, build_rtdetr

VARIANTS = {
    "mnv4_conv_small": "mobilenetv4_conv_small",
    "mnv4_conv_medium": "mobilenetv4_conv_medium",
    "mnv4_conv_large": "mobilenetv4_conv_large",
    "mnv4_hybrid_medium": "mobilenetv4_hybrid_medium",
    "mnv4_hybrid_large": "mobilenetv4_hybrid_large",
    "repvit_m0_9": "repvit_m0_9",
    "repvit_m1_0": "repvit_m1_0",
    "repvit_m1_1": "repvit_m1_1",
    "repvit_m1_5": "repvit_m1_5",
    "repvit_m2_3": "repvit_m2_3",
    "shufflenet_v2_x0_5": "torchvision/shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0": "torchvision/shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5": "torchvision/shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0": "torchvision/shufflenet_v2_x2_0",
}

# Published figures at 640 px (COCO val2017 AP); the papers name no device for RT-DETR-L's latency.
REFERENCE_ROWS = [
    {"variant": "RT-DETR-L (HGNetv2), reported", "params_m": 32.8, "gflops": 108.0, "latency_ms": "11.6 (reported)",
     "AP": 53.0},
    {"variant": "RT-DETRv2-S (ResNet-18), reported", "params_m": 20.0, "gflops": 60.0, "latency_ms": "-", "AP": 48.1},
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (fp16)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads (fp32)"


def count_gflops(model: torch.nn.Module, image: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(image)
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def latency_ms(model: torch.nn.Module, image: torch.Tensor, iters: int, warmup: int) -> float:
    on_gpu = image.device.type == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    model, image = model.to(dtype), image.to(dtype)
    for _ in range(warmup):
        model(image)
    times = []
    for _ in range(iters):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(image)
        if on_gpu:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def run_aps(folders: list[str]) -> dict[str, dict]:
    """Backbone name → summary of the trained runs given (the last one wins for a repeated backbone)."""
    found = {}
    for folder in folders:
        path = Path(folder) / "summary.json"
        if not path.exists():
            raise SystemExit(f"error: {path} does not exist (is {folder} a finished fine-tuning run?)")
        summary = json.loads(path.read_text())
        found[summary["backbone"]] = summary
    return found


def measure(name: str, backbone: str, model_cfg: dict, img_size: int, device: torch.device, iters: int,
            warmup: int, reparameterize: bool = False) -> dict:
    fields = {**model_cfg, "backbone": backbone, "num_classes": 80, "out_strides": tuple(model_cfg["out_strides"]),
              "backbone_checkpoint": None, "pretrained_backbone": False}
    model = build_rtdetr(RTDETRConfig(**fields)).eval()
    if reparameterize:  # the inference form: RepVGG units in the encoder, RepViT's blocks in the backbone
        from timm.utils.model import reparameterize_model

        model.reparameterize()
        model.backbone = reparameterize_model(model.backbone)
    image = torch.randn(1, 3, img_size, img_size)
    row = {"variant": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "gflops": count_gflops(model, image)}
    model, image = model.to(device), image.to(device)
    row["latency_ms"] = latency_ms(model, image, iters, warmup) if iters > 0 else None
    return row


def markdown(rows: list[dict], img_size: int, device: str, reparameterized: bool = False) -> str:
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else (v if v is not None else "-")

    lines = [
        f"RT-DETR at {img_size} px, batch 1, {'re-parameterised' if reparameterized else 'training-form'} "
        f"weights. Latency: {device}. GFLOPs = 2 x MACs from FlopCounterMode (grid_sample not counted).",
        "",
        "| variant | params (M) | GFLOPs | latency (ms) | AP (%) | AP50 (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {fmt(r['params_m'], '.1f')} | {fmt(r['gflops'], '.1f')} | "
                     f"{fmt(r.get('latency_ms'), '.1f')} | {fmt(r.get('AP'), '.1f')} | {fmt(r.get('AP50'), '.1f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="all", help=f"comma-separated, or 'all': {', '.join(VARIANTS)}")
    p.add_argument("--recipe", default="rtdetr_base",
                   help="neck/decoder settings come from this recipe's model section")
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--iters", type=int, default=50, help="timed forward passes (0: no latency)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--runs", nargs="*", default=[], help="fine-tuning run folders whose summary.json gives the AP")
    p.add_argument("--reparameterize", action="store_true",
                   help="measure the inference form (re-parameterised RepVGG / RepViT branches folded)")
    p.add_argument("--out", help="also write the Markdown table here")
    args = p.parse_args(argv)

    names = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.img_size % 32:
        raise SystemExit(f"error: --img-size must be a multiple of 32, got {args.img_size}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model_cfg = OmegaConf.to_container(load_det_config([f"recipe={args.recipe}"]).model)
    aps = run_aps(args.runs)
    for backbone in sorted(set(aps) - {VARIANTS[n] for n in names}):
        print(f"note: the run of {backbone} matches none of the variants measured; its AP is not shown",
              file=sys.stderr)

    rows = []
    for name in names:
        row = measure(name, VARIANTS[name], model_cfg, args.img_size, device, args.iters, args.warmup,
                      args.reparameterize)
        summary = aps.get(VARIANTS[name])
        if summary:
            row |= {"AP": 100 * summary["AP"], "AP50": 100 * summary["AP50"]}
        rows.append(row)
        print(f"{name}: {row['params_m']:.2f}M params, {row['gflops']:.1f} GFLOPs"
              + (f", {row['latency_ms']:.1f} ms" if row["latency_ms"] is not None else ""), file=sys.stderr)
    table = markdown(rows + (REFERENCE_ROWS if args.img_size == 640 else []), args.img_size, device_name(device),
                     args.reparameterize)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return table


if __name__ == "__main__":
    main()
