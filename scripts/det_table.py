"""One table of lightweight backbones inside RT-DETR and D-FINE: parameters, GFLOPs, batch-1 latency and AP.

    python scripts/det_table.py                                   # every variant, 640 px, the best device here
    python scripts/det_table.py --variants mnv4_conv_small,shufflenet_v2_x1_0 --iters 20 --onnx
    python scripts/det_table.py --runs runs/rtdetr_mnv4_conv_s runs/dfine_mnv4_conv_s --out det_table.md

Every variant gets, per head, the same neck and decoder with random weights and 80 classes: RT-DETR's rows
the `--recipe`'s (default `rtdetr_base`: RT-DETRv2-S sized), D-FINE's rows (named `<variant>, D-FINE`, each
beside its RT-DETR row) the `--dfine-recipe`'s (default `deim_base`: D-FINE-S's neck and head, those of the
`dfine_<backbone>` recipes). Parameters and GFLOPs are those of the training form (as the reference sizes
are given); GFLOPs are 2 x multiply-accumulates as counted by `torch.utils.flop_counter.FlopCounterMode`, the
deformable attention's `grid_sample` not counted. Latency is batch 1, normalisation + detector + top-K
post-processing, median over `--iters` rounds: this project's detector in its deploy form (RepVGG fused,
batch norms folded; `distill.detection.deploy`) against transformers' `RTDetrV2ForObjectDetection` (D-FINE:
`DFineForObjectDetection`) holding the same detector (timm backbones; none exists for torchvision's),
interleaved round by round, in PyTorch (fp16 on a GPU, fp32 on the CPU) and with `--onnx` in onnxruntime
(CPU). The device is named in the output. AP (COCO box AP, in percent) comes from the `summary.json` of the
run folders given with `--runs`, matched to a row by backbone name and head.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_detection import TRANSFORMERS, interleave, latency_callables, summarise  # noqa: E402

from distill.detection.recipe import load_det_config  # noqa: E402
from distill.detection.rtdetr import RTDETRConfig, build_rtdetr  # noqa: E402

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

# The two heads: the row name's suffix and the recipe whose model section builds the neck and decoder
HEADS = {"rtdetrv2": "", "dfine": ", D-FINE"}

# Published figures at 640 px (COCO val2017 AP); the papers name no device for RT-DETR-L's latency. D-FINE-S and
# DEIM-D-FINE-S (the same detector trained as DEIM) from their repositories' READMEs, latency on a T4 with
# TensorRT 10.4 in fp16.
REFERENCE_ROWS = [
    {"variant": "RT-DETR-L (HGNetv2), reported", "params_m": 32.8, "gflops": 108.0, "ours ms": "11.6 (reported)",
     "AP": 53.0},
    {"variant": "RT-DETRv2-S (ResNet-18), reported", "params_m": 20.0, "gflops": 60.0, "AP": 48.1},
    {"variant": "D-FINE-S (HGNetv2-B0), reported", "params_m": 10.0, "gflops": 25.0,
     "ours ms": "3.49 (T4, TensorRT fp16, reported)", "AP": 48.5},
    {"variant": "DEIM-D-FINE-S (HGNetv2-B0), reported", "params_m": 10.0, "gflops": 25.0, "AP": 49.0},
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


def run_aps(folders: list[str]) -> dict[tuple[str, str], dict]:
    """(backbone name, head) → summary of the trained runs given (the last one wins for a repeated pair)."""
    found = {}
    for folder in folders:
        path = Path(folder) / "summary.json"
        if not path.exists():
            raise SystemExit(f"error: {path} does not exist (is {folder} a finished fine-tuning run?)")
        summary = json.loads(path.read_text())
        head = summary.get("config", {}).get("model", {}).get("head", "rtdetrv2")
        found[(summary["backbone"], head)] = summary
    return found


def measure(name: str, backbone: str, model_cfg: dict, img_size: int, device: torch.device, iters: int,
            warmup: int, onnx: bool = False) -> dict:
    fields = {**model_cfg, "backbone": backbone, "num_classes": 80, "out_strides": tuple(model_cfg["out_strides"]),
              "backbone_checkpoint": None, "pretrained_backbone": False, "init_from": None}
    model = build_rtdetr(RTDETRConfig(**fields)).eval()
    image = torch.randn(1, 3, img_size, img_size)
    row = {"variant": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "gflops": count_gflops(model, image)}
    if iters > 0:
        theirs = None
        if backbone.split("/")[0] != "torchvision":
            from distill.detection.hf_convert import to_transformers, to_transformers_dfine

            convert = to_transformers_dfine if model.cfg.head == "dfine" else to_transformers
            theirs = convert(model, [f"class_{i}" for i in range(80)])
        dtype = torch.float16 if device.type == "cuda" else None
        calls = latency_callables(model, theirs, img_size, device, dtype, onnx, torch.get_num_threads())
        times = summarise(interleave(calls, iters, warmup, device))
        row |= {f"{side} ms": t["median_ms"] for side, t in times.items()}
        row["ratio"] = times["ours"].get("paired_ratio")
        row["onnx ratio"] = times.get("ours, onnxruntime", {}).get("paired_ratio")
    return row


COLUMNS = ["ours ms", f"{TRANSFORMERS} ms", "ratio", "ours, onnxruntime ms", f"{TRANSFORMERS}, onnxruntime ms",
           "onnx ratio"]


def markdown(rows: list[dict], img_size: int, device: str) -> str:
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else (v if v is not None else "-")

    lines = [
        f"RT-DETR and D-FINE at {img_size} px, batch 1. Latency: {device}; ours in its deploy form, "
        "transformers' RTDetrV2ForObjectDetection (D-FINE rows: DFineForObjectDetection) holding the same detector; "
        "ratio = ours / transformers (median of the per-round ratios) in PyTorch and in ONNX Runtime. "
        "GFLOPs = 2 x MACs from FlopCounterMode (grid_sample not counted).",
        "",
        "| variant | params (M) | GFLOPs | latency (ms) | transformers (ms) | ratio | ONNX Runtime (ms) "
        "| transformers, ONNX Runtime (ms) | ratio | AP (%) | AP50 (%) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        timings = " | ".join(fmt(r.get(c), ".2f" if c.endswith("ratio") else ".1f") for c in COLUMNS)
        lines.append(f"| {r['variant']} | {fmt(r['params_m'], '.1f')} | {fmt(r['gflops'], '.1f')} | {timings} | "
                     f"{fmt(r.get('AP'), '.1f')} | {fmt(r.get('AP50'), '.1f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="all", help=f"comma-separated, or 'all': {', '.join(VARIANTS)}")
    p.add_argument("--recipe", default="rtdetr_base",
                   help="RT-DETR rows: neck/decoder settings come from this recipe's model section")
    p.add_argument("--dfine-recipe", default="deim_base",
                   help="D-FINE rows: neck/head settings come from this recipe's model section (model.head=dfine)")
    p.add_argument("--heads", default="rtdetrv2,dfine", help=f"comma-separated: {', '.join(HEADS)}")
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--iters", type=int, default=50, help="timed forward passes (0: no latency)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--runs", nargs="*", default=[], help="fine-tuning run folders whose summary.json gives the AP")
    p.add_argument("--onnx", action="store_true", help="latency in onnxruntime too (CPU)")
    p.add_argument("--out", help="also write the Markdown table here")
    args = p.parse_args(argv)

    names = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.img_size % 32:
        raise SystemExit(f"error: --img-size must be a multiple of 32, got {args.img_size}")
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    if not heads or set(heads) - set(HEADS):
        raise SystemExit(f"error: --heads takes {', '.join(HEADS)}, got {args.heads!r}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model_cfgs = {}
    for head in heads:
        recipe = args.dfine_recipe if head == "dfine" else args.recipe
        model_cfgs[head] = OmegaConf.to_container(load_det_config([f"recipe={recipe}"]).model)
        if model_cfgs[head]["head"] != head:
            raise SystemExit(f"error: recipe {recipe} has model.head={model_cfgs[head]['head']}, not {head}")
    aps = run_aps(args.runs)
    for backbone, head in sorted(set(aps) - {(VARIANTS[n], h) for n in names for h in heads}):
        print(f"note: the run of {backbone} with head {head} matches no row measured; its AP is not shown",
              file=sys.stderr)

    rows = []
    for name in names:
        for head in heads:
            row = measure(name + HEADS[head], VARIANTS[name], model_cfgs[head], args.img_size, device, args.iters,
                          args.warmup, args.onnx)
            summary = aps.get((VARIANTS[name], head))
            if summary:
                row |= {"AP": 100 * summary["AP"], "AP50": 100 * summary["AP50"]}
            rows.append(row)
            print(f"{row['variant']}: {row['params_m']:.2f}M params, {row['gflops']:.1f} GFLOPs"
                  + (f", {row['ours ms']:.1f} ms" if "ours ms" in row else ""), file=sys.stderr)
    table = markdown(rows + (REFERENCE_ROWS if args.img_size == 640 else []), args.img_size, device_name(device))
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return table


if __name__ == "__main__":
    main()
