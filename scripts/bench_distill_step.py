"""Distillation step throughput: this package's step against one driven by timm's LogitDistillationTask.

    python scripts/bench_distill_step.py                                 # small CPU defaults
    python scripts/bench_distill_step.py --device cuda --precision bf16 --student mobilenetv4_conv_medium \\
        --teacher resnet50 --batch 256 --img-size 256 --steps 50 --rounds 5 --channels-last

Both sides train the same student initialisation against the same frozen teacher, on the same synthetic
uint8 batches already in memory (data loading excluded), with the same precision and optimizer settings.

- ours: the operations of `distill/pretrain.py`'s loop, built from the package: uint8 -> float / 255 on the
  device, `mixup_batch` on the mixup sources' samples, the `FrozenTeacher` (its `InputAdapter` normalises)
  under no-grad, the student through its `InputAdapter`, `distillation_loss` (KL at temperature T), backward,
  the gradient norm (pretrain's finite-update check), an AdamW step from `build_optimizer`, EMA update.
- timm: uint8 -> float / 255, student normalisation (timm's prefetcher does this), `timm.data.Mixup` (lam
  uniform = Beta(1, 1), whole batch, as timm has no per-sample mask), `LogitDistillationTask.forward`
  (KL + task loss, task weight 0), backward, the same gradient norm, AdamW from `create_optimizer_v2`, EMA.

Single process, no Accelerate / DDP wrapper on either side. Rounds alternate which side runs first; medians.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.task import LogitDistillationTask
from timm.utils import ModelEmaV3

from distill.data.mixup import mixup_batch
from distill.engine.optim import build_optimizer
from distill.losses import distillation_loss, soften
from distill.models.factory import create_model, input_spec
from distill.models.teacher import FrozenTeacher, InputAdapter

PRECISION = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    platform.processor() or platform.machine())
        name += f", {torch.get_num_threads()} threads of {len(os.sched_getaffinity(0))} cores"
    return f"{name}; torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}"


def synthetic_batches(n: int, batch: int, img_size: int, num_classes: int, mixup_share: float, device):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        images = torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, num_classes, (batch,), generator=g)
        mixup = torch.rand(batch, generator=g) < mixup_share
        out.append((images.to(device), labels.to(device), mixup.to(device)))
    return out


class OursStep:
    def __init__(self, student, teacher, args, device):
        self.student, self.teacher, self.args = student.to(device).train(), teacher, args
        self.student_input = InputAdapter(input_spec(student)).to(device)
        self.optimizer = build_optimizer(student, args.lr, args.weight_decay)
        self.ema = ModelEmaV3(student, decay=0.9998)
        self.autocast = dict(device_type=device.type, dtype=PRECISION[args.precision] or torch.float32,
                             enabled=args.precision != "fp32")
        self.step_count = 0

    def __call__(self, images, labels, mixup):
        a = self.args
        images = images.float().div_(255)
        images, partner, lam = mixup_batch(images, mixup)
        if a.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(**self.autocast):
            targets = soften(self.teacher(images), a.temperature)
            logits = self.student(self.student_input(images))
        terms = distillation_loss(logits, targets, labels, labels[partner], lam, a.temperature, 1.0, 0.0)
        terms["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), float("inf"))
        if bool(torch.isfinite(grad_norm)):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.student, step=self.step_count)
        self.step_count += 1
        return terms["loss"]


class TimmStep:
    def __init__(self, student, teacher_model, args, device, num_classes):
        self.args = args
        student = student.to(device)
        self.task = LogitDistillationTask(
            student, teacher_model, criterion=SoftTargetCrossEntropy(), distill_loss_weight=1.0,
            task_loss_weight=0.0, temperature=args.temperature, device=device, verbose=False,
        ).train()
        self.student = student
        cfg = student.pretrained_cfg
        self.mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)
        self.mixup = Mixup(mixup_alpha=1.0, prob=1.0, mode="batch", num_classes=num_classes, label_smoothing=0.0)
        self.optimizer = create_optimizer_v2(student, "adamw", lr=args.lr, weight_decay=args.weight_decay)
        self.ema = ModelEmaV3(student, decay=0.9998)
        self.autocast = dict(device_type=device.type, dtype=PRECISION[args.precision] or torch.float32,
                             enabled=args.precision != "fp32")
        self.step_count = 0

    def __call__(self, images, labels, mixup):
        images = images.float().div_(255).sub_(self.mean).div_(self.std)
        images, targets = self.mixup(images, labels)
        if self.args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(**self.autocast):
            loss = self.task(images, targets)["loss"]
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), float("inf"))
        if bool(torch.isfinite(grad_norm)):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.student, step=self.step_count)
        self.step_count += 1
        return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(step, batches, n, device) -> float:
    sync(device)
    start = time.perf_counter()
    for i in range(n):
        step(*batches[i % len(batches)])
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="mobilenetv4_conv_small_035")
    ap.add_argument("--teacher", default="resnet18")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=96)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=list(PRECISION))
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the rounds")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    ap.add_argument("--mixup-share", type=float, default=0.25, help="share of samples from mixup sources (ours)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch's default); 1 keeps CPU figures stable on a shared machine")
    args = ap.parse_args()

    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    student = create_model(args.student, args.num_classes)
    teacher_model = create_model(args.teacher, args.num_classes).to(device).eval().requires_grad_(False)
    if args.channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher_model = teacher_model.to(memory_format=torch.channels_last)
    teacher = FrozenTeacher(teacher_model, input_spec(teacher_model), None).to(device)

    sides = {"ours": OursStep(copy.deepcopy(student), teacher, args, device),
             "timm": TimmStep(copy.deepcopy(student), teacher_model, args, device, args.num_classes)}
    batches = synthetic_batches(2, args.batch, args.img_size, args.num_classes, args.mixup_share, device)
    for step in sides.values():
        run_steps(step, batches, args.warmup, device)
    times = {k: [] for k in sides}
    for r in range(args.rounds):
        for k in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            times[k].append(run_steps(sides[k], batches, args.steps, device))
    rate = {k: args.steps * args.batch / statistics.median(v) for k, v in times.items()}

    print(f"device: {device_line(device)}")
    print(f"student {args.student}, teacher {args.teacher}, batch {args.batch}, {args.img_size} px, "
          f"{args.precision}{', channels_last' if args.channels_last else ''}; {args.warmup} warm-up + "
          f"{args.rounds} alternating rounds x {args.steps} steps per side; synthetic in-memory batches")
    print("| step | images/s (median) | per-round images/s |")
    print("|---|---:|---|")
    for k in sides:
        per = ", ".join(f"{args.steps * args.batch / t:.0f}" for t in times[k])
        print(f"| {k} | {rate[k]:.1f} | {per} |")
    print(f"ratio ours / timm: {rate['ours'] / rate['timm']:.3f}")


if __name__ == "__main__":
    main()
