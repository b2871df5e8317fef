"""Every GPU speed target of the project, measured side by side in one run, printed as one Markdown table.

    python scripts/bench_gpu.py                     # one GPU, full sizes: about 8 minutes on an H100 (a guess)
    python scripts/bench_gpu.py --quick             # same sizes and rows, fewer repetitions: ~3 min (estimated)
    python scripts/bench_gpu.py --quick --smoke     # the CPU, tiny sizes: seconds (the tests keep it working)
    python scripts/bench_gpu.py --smoke             # the CPU, tiny sizes, the full repetitions

Rows (each a ratio of two figures measured in this run, on this device):
1. compute bound: the student alone (forward, backward, fused AdamW) on synthetic batches already on the
   device, in the run's precision and memory format, compiled: the fastest any distillation loop can train it;
2. online distillation: `distill.pretrain.distill_step`, the real loop step (teacher in bf16, channels-last,
   inference mode, compiled for inference; student compiled in place) against a loop driven by timm's
   `LogitDistillationTask` with the settings timm's users turn on (channels-last, `torch.compile` of the
   student); same student, teacher, batch, precision and uint8 batches on the device. Target: >= 1.3x;
3. offline mode: the real loader (`build_train_loader`, StatefulDataLoader with N workers) reading stored views
   with full teacher distributions from shards on local disk, feeding the real step; images/s against row 1
   and the share of step time spent waiting for data. Target: >= 90% of the compute bound;
4. RT-DETR: training step and batch-1 latency of ours against transformers' RT-DETRv2 with the same timm
   backbone, at 640 px (`scripts/bench_detection.py`). Targets: step time <= 1/1.3, latency <= 0.8x;
5. host syncs: the synchronising CUDA calls CUDA's sync debug mode reports in a few steps of rows 2 and 3
   (loader included). Target: none.

`--quick` keeps every row and every size and cuts repetitions (warm-up, timed steps, stored views, detection
rounds): most of its time is compiling. Rows print as they are measured, so a run stopped early keeps them.

Weights are random (nothing is downloaded); throughput does not depend on them.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from bench_distill_step import TimmStep  # noqa: E402

from distill.data.loader import build_train_loader  # noqa: E402
from distill.data.mix import DataMix  # noqa: E402
from distill.data.shards import SOFT_LABELS, encode_jpeg  # noqa: E402
from distill.data.soft_labels import encode_record  # noqa: E402
from distill.engine.ema import build_ema  # noqa: E402
from distill.engine.guards import UpdateGuard  # noqa: E402
from distill.engine.optim import build_optimizer, warmup_cosine  # noqa: E402
from distill.models.factory import create_model, input_spec  # noqa: E402
from distill.models.teacher import InputAdapter, create_teacher  # noqa: E402
from distill.pretrain import StepParts, distill_step  # noqa: E402

FULL = dict(student="mobilenetv4_conv_small", teacher="tf_efficientnet_b3", teacher_size=300, img_size=224,
            batch=256, classes=1000, views=12_288, workers=min(16, os.cpu_count() or 1), warmup=15, steps=30,
            rounds=3, compile=True, precision="bf16", det_size=640, det_rounds=(20, 50))
SMOKE = dict(student="mobilenetv4_conv_small_035", teacher="resnet18", teacher_size=96, img_size=64, batch=8,
             classes=10, views=96, workers=2, warmup=2, steps=3, rounds=2, compile=False, precision="no",
             det_size=128, det_rounds=(2, 2))
# --quick: fewer repetitions, same sizes; the first warm-up step compiles, the others settle cudnn's choices
QUICK = dict(warmup=5, steps=10, views=3_072, det_rounds=(6, 16))
QUICK_SMOKE = dict(warmup=1, steps=2, views=48, det_rounds=(1, 1))
SYNC_STEPS = 5  # steps counted under CUDA's sync debug mode, after the timed ones


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        cuda = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(device)}"
    else:
        cuda = f"CPU ({len(os.sched_getaffinity(0))} cores)"
    return f"{cuda}; torch {torch.__version__}; Python {platform.python_version()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step, n: int, batch: int, device) -> float:
    """Images per second over `n` calls of `step`."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return n * batch / (time.perf_counter() - start)


def alternate(sides: dict, cfg: dict, device) -> dict[str, float]:
    """Median images/s of each side over rounds that alternate which side goes first."""
    for step in sides.values():
        rate(step, cfg["warmup"], cfg["batch"], device)
    runs = {k: [] for k in sides}
    for r in range(cfg["rounds"]):
        for k in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            runs[k].append(rate(sides[k], cfg["steps"], cfg["batch"], device))
    return {k: statistics.median(v) for k, v in runs.items()}


def host_syncs(step, n: int, device) -> int | None:
    """Synchronising CUDA calls (a host waiting for the device) over `n` calls of `step`, as CUDA's sync debug
    mode reports them; None on the CPU, where the steps still run."""
    if device.type != "cuda":
        for _ in range(n):
            step()
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# ---- the parts of the distillation loop ------------------------------------------------------------------


class Accel:
    """The few Accelerator features `distill_step` uses, for one process without Accelerate's wrappers."""

    def __init__(self, device, precision: str):
        self.device, self.mixed_precision, self.scaler = device, precision, None
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self._dtype or torch.float32, enabled=self._dtype is not None)

    def accumulate(self, model):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def unwrap_model(self, model):
        return model


class LoopCfg:
    """The recipe keys `distill_step` reads."""

    def __init__(self, cfg: dict, channels_last: bool):
        self.student = argparse.Namespace(channels_last=channels_last, num_classes=cfg["classes"])
        self.loss = argparse.Namespace(temperature=1.0, kd_weight=1.0, ce_weight=0.0, label_smoothing=0.0)
        self.optim = argparse.Namespace(clip_grad=None)


def our_parts(student, teacher, cfg, device, offline: bool) -> StepParts:
    accel = Accel(device, cfg["precision"])
    channels_last = device.type == "cuda"
    student = student.to(device)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    if cfg["compile"]:
        student.compile()
    optimizer = build_optimizer(student, 2e-3, 0.01)
    return StepParts(accel, student.train(), InputAdapter(input_spec(student)).to(device), teacher, optimizer,
                     warmup_cosine(optimizer, 10, 10**6), build_ema(student, 0.9998, True),
                     UpdateGuard(accel, optimizer, 10**9), torch.tensor([False, True], device=device), offline)


def synthetic_batches(cfg: dict, device, n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        b, s = cfg["batch"], cfg["img_size"]
        probs = torch.softmax(torch.randn(b, cfg["classes"], generator=g), dim=1)
        out.append({"image": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g).to(device),
                    "label": torch.randint(0, cfg["classes"], (b,), generator=g).to(device),
                    "source": (torch.rand(b, generator=g) < 0.5).long().to(device),
                    "soft_idx": torch.arange(cfg["classes"]).expand(b, -1).to(device), "soft_prob": probs.to(device),
                    "partner_label": torch.randint(0, cfg["classes"], (b,), generator=g).to(device),
                    "lam": torch.rand(b, generator=g).to(device)})
    return out


# ---- rows -----------------------------------------------------------------------------------------------


def compute_bound(student, cfg, device) -> float:
    """The student alone: forward, backward and the update on batches already on the device."""
    parts = our_parts(copy.deepcopy(student), None, cfg, device, offline=False)
    opt, accel = parts.optimizer, parts.accelerator
    batches = synthetic_batches(cfg, device)
    it = [0]

    def step():
        batch = batches[it[0] % len(batches)]
        it[0] += 1
        images = batch["image"].float().div_(255)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with accel.autocast():
            logits = parts.student(parts.student_input(images))
        torch.nn.functional.cross_entropy(logits.float(), batch["label"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return alternate({"bound": step}, cfg, device)["bound"]


def online(student, cfg, device) -> dict[str, float]:
    teacher = create_teacher(cfg["teacher"], False, None, cfg["classes"], cfg["teacher_size"])
    ours_teacher = copy.deepcopy(teacher).for_device(device, cfg["precision"], device.type == "cuda", cfg["compile"])
    parts = our_parts(copy.deepcopy(student), ours_teacher, cfg, device, offline=False)
    loop_cfg = LoopCfg(cfg, device.type == "cuda")
    batches = synthetic_batches(cfg, device)
    count = [0]

    def ours():
        distill_step(parts, [batches[count[0] % 2]], loop_cfg, count[0])
        count[0] += 1

    timm_args = argparse.Namespace(temperature=1.0, lr=2e-3, weight_decay=0.01, channels_last=device.type == "cuda",
                                   precision={"no": "fp32"}.get(cfg["precision"], cfg["precision"]))
    timm_student = copy.deepcopy(student).to(device)
    if timm_args.channels_last:
        timm_student = timm_student.to(memory_format=torch.channels_last)
    teacher_model = copy.deepcopy(teacher.model).to(device).eval().requires_grad_(False)
    if timm_args.channels_last:
        teacher_model = teacher_model.to(memory_format=torch.channels_last)
    timm_side = TimmStep(timm_student, teacher_model, timm_args, device, cfg["classes"])
    if cfg["compile"]:  # timm's train.py --torchcompile compiles the model it trains
        timm_side.task.trainable_module.compile()
    timm_batches = [(b["image"], b["label"], b["source"].bool()) for b in batches]

    def timm():
        timm_side(*timm_batches[count[0] % 2])
        count[0] += 1

    rates = alternate({"ours": ours, "timm": timm}, cfg, device)
    return rates | {"syncs": host_syncs(ours, SYNC_STEPS, device)}


def write_views(folder: Path, cfg: dict) -> None:
    """Stored views as `label_views.py` writes them: a JPEG view and the teacher's full distribution (fp16)."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    side, per_shard = cfg["img_size"], max(8, cfg["views"] // (4 * max(1, cfg["workers"])))
    base = [(rng.random((side, side, 3)) * 255).astype(np.uint8) for _ in range(16)]
    with wds.ShardWriter(str(folder / "views-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(cfg["views"]):
            label = int(rng.integers(cfg["classes"]))
            prob = rng.dirichlet(np.full(cfg["classes"], 0.1)).astype(np.float32)
            sink.write({"__key__": f"v{i:07d}", "jpg": encode_jpeg(np.roll(base[i % 16], i, axis=1), 90),
                        "cls": str(label).encode(),
                        SOFT_LABELS: encode_record(prob, label, 1.0, cfg["classes"])})


def offline(student, cfg, device, folder: Path) -> dict[str, float]:
    """The real loader feeding the real step; returns images/s, the share of time waiting for data and the
    host syncs of a few more steps."""
    write_views(folder / "views", cfg)
    mix = DataMix.from_dict({"sources": {"views": {"shards": "views", "augment": "flip"}}}, folder)
    parts = our_parts(copy.deepcopy(student), None, cfg, device, offline=True)
    parts.mixup_sources = torch.tensor([False], device=device)
    loop_cfg = LoopCfg(cfg, device.type == "cuda")
    loader = build_train_loader(mix, cfg["img_size"], cfg["batch"], cfg["workers"], 0, 10**9, soft_labels=True)
    batches = iter(loader)
    for i in range(cfg["warmup"]):
        distill_step(parts, [next(batches)], loop_cfg, i)
    waiting = 0.0
    sync(device)
    start = time.perf_counter()
    n = cfg["steps"] * cfg["rounds"]
    for i in range(n):
        t = time.perf_counter()
        batch = next(batches)
        waiting += time.perf_counter() - t
        distill_step(parts, [batch], loop_cfg, i)
    sync(device)
    total = time.perf_counter() - start
    more = itertools.count(n)
    syncs = host_syncs(lambda: distill_step(parts, [next(batches)], loop_cfg, next(more)), SYNC_STEPS, device)
    return {"rate": n * cfg["batch"] / total, "waiting": waiting / total, "syncs": syncs}


def detection(cfg, device, smoke: bool) -> dict[str, float]:
    """Train-step time and batch-1 latency (ours in its deploy form), ours and transformers' RT-DETRv2 with the
    same timm backbone (see bench_detection.py), medians in ms."""
    from bench_detection import DetectorSizes, latency_times, summarise, train_step_times

    dtype = torch.bfloat16 if cfg["precision"] == "bf16" else None
    if smoke:
        sizes, batch = DetectorSizes(num_classes=10, num_queries=30, num_denoising=10), 2
    else:  # RT-DETRv2-S widths with the student as backbone
        sizes, batch = DetectorSizes("mobilenetv4_conv_small", hidden_dim=256, ffn_dim=1024, num_queries=300), 16
    rounds = cfg["det_rounds"]
    train = summarise(train_step_times(sizes, device, cfg["det_size"], dtype, batch_size=batch, rounds=rounds[0],
                                       warmup=2))
    latency = summarise(latency_times(sizes, device, cfg["det_size"], dtype, rounds=rounds[1], warmup=3))
    side = lambda times, name: next(v["median_ms"] for k, v in times.items() if k.startswith(name))  # noqa: E731
    return {"ours_train_ms": side(train, "ours"), "hf_train_ms": side(train, "transformers"),
            "ours_latency_ms": side(latency, "ours"), "hf_latency_ms": side(latency, "transformers")}


def rows_of(cfg, device, student, skip_detection: bool, smoke: bool):
    """The table's rows, each yielded as soon as it is measured."""
    bound = compute_bound(student, cfg, device)
    yield "compute bound", ("compute bound: student alone, synthetic batches on the device", f"{bound:,.0f} img/s",
                            "", "")
    kd = online(student, cfg, device)
    yield "online", ("online KD: ours vs timm LogitDistillationTask", f"{kd['ours']:,.0f} vs {kd['timm']:,.0f} img/s",
                     f"{kd['ours'] / kd['timm']:.2f}x",
                     "met" if kd["ours"] >= 1.3 * kd["timm"] else "not met (>= 1.3x)")
    with tempfile.TemporaryDirectory() as tmp:
        off = offline(student, cfg, device, Path(tmp))
    yield "offline", (f"offline: real shards, {cfg['workers']} loader workers, vs compute bound",
                      f"{off['rate']:,.0f} img/s, {off['waiting']:.0%} of step time waiting for data",
                      f"{off['rate'] / bound:.2f}x", "met" if off["rate"] >= 0.9 * bound else "not met (>= 0.90x)")
    syncs = (kd["syncs"], off["syncs"])
    yield "", (
        "host syncs in the training step: online, offline (CUDA sync debug mode)",
        "not counted on the CPU" if None in syncs else f"{syncs[0]} and {syncs[1]} in {SYNC_STEPS} steps each", "",
        "" if None in syncs else "met" if syncs == (0, 0) else "not met (none)")
    if skip_detection:
        return
    det = detection(cfg, device, smoke)
    yield "RT-DETR", (f"RT-DETR train step, {cfg['det_size']} px: ours vs transformers",
                      f"{det['ours_train_ms']:.1f} vs {det['hf_train_ms']:.1f} ms",
                      f"{det['hf_train_ms'] / det['ours_train_ms']:.2f}x faster",
                      "met" if det["hf_train_ms"] >= 1.3 * det["ours_train_ms"] else "not met (>= 1.3x)")
    yield "", (f"RT-DETR batch-1 latency, {cfg['det_size']} px: ours vs transformers",
               f"{det['ours_latency_ms']:.2f} vs {det['hf_latency_ms']:.2f} ms",
               f"{det['ours_latency_ms'] / det['hf_latency_ms']:.2f}x the time",
               "met" if det["ours_latency_ms"] <= 0.8 * det["hf_latency_ms"] else "not met (<= 0.80x)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--quick", action="store_true", help="every row and size, fewer repetitions")
    ap.add_argument("--skip-detection", action="store_true")
    args = ap.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    if args.quick:
        cfg = cfg | (QUICK_SMOKE if args.smoke else QUICK)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu":
        torch.set_num_threads(1)  # steady CPU figures: a spinning thread pool on a busy machine swamps them
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    student = create_model(cfg["student"], cfg["classes"])

    print(f"device: {device_line(device)}")
    print(f"student {cfg['student']} at {cfg['img_size']} px, teacher {cfg['teacher']} at {cfg['teacher_size']} px, "
          f"batch {cfg['batch']}, precision {cfg['precision']}, compile {cfg['compile']}; {cfg['warmup']} warm-up + "
          f"{cfg['rounds']} alternating rounds x {cfg['steps']} steps" + (" (smoke sizes)" if args.smoke else "")
          + (" (quick)" if args.quick else ""))
    print("\n| figure | measured | ratio | target |\n|---|---|---:|---|", flush=True)
    seconds, start = [], time.perf_counter()
    for name, row in rows_of(cfg, device, student, args.skip_detection, args.smoke):
        print("| " + " | ".join(row) + " |", flush=True)
        if name:  # a row's own measurement (the syncs come with rows 2-3, the latency with the train step)
            seconds.append(f"{name} {time.perf_counter() - start:.0f} s")
            start = time.perf_counter()
    print("\nseconds per row, compiling included: " + ", ".join(seconds))


if __name__ == "__main__":
    main()
