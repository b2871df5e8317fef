"""The MobileNetV4 paper's data-mix ablation on a small proxy: D2 alone, D1+D2 (1:1) and D1+D2+D3 (1:1:2), the
same student, teacher, steps and batch, several seeds each; a Markdown table of mean +- std top-1.

    python scripts/ablate_mix.py                           # 15-30 minutes on 2 CPU cores
    python scripts/ablate_mix.py --write-benchmarks        # and put the table in BENCHMARKS.md

The proxy, all generated (`distill.data.synthetic`), nothing downloaded:
- "ImageNet": a small labelled set (`--train-per-class`) that D1 (Inception crop + RandAugment m9) and D2
  (Inception crop + mixup with a weight uniform in [0, 1]) both read; a validation set of the same classes.
- the teacher: trained on labels of a larger, separate set of the same classes (it knows more than the
  student's data shows, as EfficientNet-L2 does), then frozen; it labels every view online.
- D3: `distill/curate.py` over a pool of extra images in skewed class shares with 10% images of no class at
  all; the scorer is a small model trained on the labelled set only (the paper's EfficientNet-B0 role);
  threshold 0.3, at most K per class, short classes filled by repeats. D3 views: Inception crop + RandAugment m5.
Every run goes through `distill/pretrain.py` as a user runs it; the numbers are its `summary.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill.data.synthetic import generate_classification  # noqa: E402

MIXES = {
    "D2": {"d2": ("small/train", "{name: inception}", True, 1)},
    "D1+D2 (1:1)": {"d1": ("small/train", "{name: inception_randaug, num_ops: 2, magnitude: 9}", False, 1),
                    "d2": ("small/train", "{name: inception}", True, 1)},
    "D1+D2+D3 (1:1:2)": {"d1": ("small/train", "{name: inception_randaug, num_ops: 2, magnitude: 9}", False, 1),
                         "d2": ("small/train", "{name: inception}", True, 1),
                         "d3": ("d3", "{name: inception_randaug, num_ops: 2, magnitude: 5}", False, 2)},
}
BEGIN, END = "<!-- ablate_mix:begin -->", "<!-- ablate_mix:end -->"


def write_mix(path: Path, sources: dict) -> Path:
    lines = ["sources:"]
    for name, (shards, augment, mixup, weight) in sources.items():
        lines.append(f"  {name}: {{shards: {shards}, augment: {augment}, mixup: {str(mixup).lower()}, weight: {weight}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *cmd], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def pool_labels(pool_dir: Path) -> dict[tuple[int, int], int]:
    """True class of every pool image by (unit, position), for checking what curation kept (-1: no class)."""
    labels = {}
    for unit, shard in enumerate(sorted(pool_dir.glob("*.tar"))):
        with tarfile.open(shard) as tar:
            cls = [int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")]
        labels.update({(unit, i): c for i, c in enumerate(cls)})
    return labels


def curation_check(d3: Path, pool: Path) -> dict:
    """How clean D3 is: kept images whose pseudo-label is their true class, and object-free images kept."""
    truth, kept = pool_labels(pool), []
    for shard in sorted(d3.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".cls") and "_rep" not in m.name:
                    unit, ordinal = m.name.split(".")[0].lstrip("u").split("_")
                    kept.append((truth[(int(unit), int(ordinal))], int(tar.extractfile(m).read())))
    summary = json.loads((d3 / "summary.json").read_text())
    return {"pool": len(truth), "pool_no_class": sum(c < 0 for c in truth.values()), "kept": len(kept),
            "kept_correct": sum(t == c for t, c in kept), "kept_no_class": sum(t < 0 for t, _ in kept),
            "repeated": summary["repeated"], "written": summary["written"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/ablate_mix", help="data, runs and logs go here")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=40, help="the student's labelled images (D1, D2)")
    p.add_argument("--teacher-per-class", type=int, default=300, help="the teacher's own labelled images")
    p.add_argument("--pool-per-class", type=int, default=150, help="extra pool images per class, before skew")
    p.add_argument("--val-per-class", type=int, default=60)
    p.add_argument("--source-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=48, help="training side of teacher and student")
    p.add_argument("--per-class", type=int, default=100, help="K: curated D3 images per class")
    p.add_argument("--student", default="mobilenetv4_conv_small_035")
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.004)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--write-benchmarks", action="store_true")
    a = p.parse_args()
    work = (ROOT / a.work).resolve() if not Path(a.work).is_absolute() else Path(a.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    start = time.time()

    # ---- data -------------------------------------------------------------------------------------------
    if not (work / "small" / "val" / "manifest.json").exists():
        generate_classification(work / "small", num_classes=a.classes, train_per_class=a.train_per_class,
                                val_per_class=a.val_per_class, img_size=a.source_size, seed=0, shard_size=50,
                                extra_per_class=a.pool_per_class)
    if not (work / "teacher_data" / "train" / "manifest.json").exists():
        generate_classification(work / "teacher_data", num_classes=a.classes, train_per_class=a.teacher_per_class,
                                val_per_class=1, img_size=a.source_size, seed=1, shard_size=200)
    labelled = write_mix(work / "labelled.yaml", {"train": ("small/train", "{name: inception}", False, 1)})
    teacher_mix = write_mix(work / "teacher_mix.yaml", {"train": ("teacher_data/train", "{name: inception}", False, 1)})
    base = work / "base.yaml"
    base.write_text(f"""
student: {{name: {a.student}, num_classes: {a.classes}, drop_rate: 0.1}}
teacher: {{name: {a.teacher}, pretrained: false, fit_lr: 0.003}}
data: {{root: {work}, img_size: {a.img_size}, batch_size: {a.batch_size}, num_workers: 1, val_shards: small/val,
        val_batch_size: 200}}
optim: {{lr: {a.lr}, weight_decay: 0.05, warmup_steps: 20, clip_grad: 5.0}}
train: {{steps: {a.steps}, ema_decay: 0.99, log_every: 50, ckpt_every: 100000, trackers: [jsonl]}}
""")
    pretrain = str(ROOT / "distill" / "pretrain.py")

    # ---- the teacher: trained once on its own labelled set ----------------------------------------------
    teacher = work / "teacher" / "teacher.pt"
    if not teacher.exists():
        print(f"teacher: {a.teacher} on {a.classes * a.teacher_per_class} labelled images, {a.teacher_steps} steps")
        run([pretrain, f"recipe={base}", f"output_dir={work / 'teacher'}", f"data.mix={teacher_mix}",
             f"teacher.fit_steps={a.teacher_steps}", "train.steps=1"], work / "logs" / "teacher.log")
    teacher_top1 = json.loads((work / "teacher" / "summary.json").read_text())["teacher_top1"]

    # ---- D3: curated from the pool by a small scorer trained on the labelled set ----------------------
    if not (work / "d3" / "manifest.json").exists():
        print(f"curation: pool of {sum(1 for _ in (work / 'small' / 'extra').glob('*.tar'))} shards")
        (work / "curate.yaml").write_text(f"""
data_root: {work}
output_dir: d3
pool: {{shards: small/extra}}
scorer: {{name: test_resnet, pretrained: false, num_classes: {a.classes}, img_size: {a.source_size}, fit_steps: 300,
          fit_lr: 0.003, fit_mix: {labelled}, fit_img_size: {a.source_size}}}
select: {{threshold: 0.3, per_class: {a.per_class}, fill: repeat}}
batch_size: 128
num_workers: 1
precision: "no"
maxcount: 200
""")
        run([str(ROOT / "distill" / "curate.py"), f"recipe={work / 'curate.yaml'}"], work / "logs" / "curate.log")
    check = curation_check(work / "d3", work / "small" / "extra")

    # ---- students: the same budget on each mix --------------------------------------------------------
    results: dict[str, list[dict]] = {}
    for label, sources in MIXES.items():
        tag = re.sub(r"[^A-Za-z0-9]+", "_", label.split(" ")[0]).strip("_").lower()
        mix = write_mix(work / f"mix_{tag}.yaml", sources)
        for seed in a.seeds:
            out = work / "runs" / f"{tag}-seed{seed}"
            if not (out / "summary.json").exists():
                t0 = time.time()
                run([pretrain, f"recipe={base}", f"output_dir={out}", f"data.mix={mix}", f"train.seed={seed}",
                     f"teacher.checkpoint={teacher}", "teacher.fit_steps=0"], work / "logs" / f"{tag}-seed{seed}.log")
                print(f"{label:<18} seed {seed}: {time.time() - t0:5.0f} s")
            results.setdefault(label, []).append(json.loads((out / "summary.json").read_text()))

    minutes = (time.time() - start) / 60
    table = format_table(results, teacher_top1, check, a, minutes)
    print("\n" + table)
    if a.write_benchmarks:
        path = ROOT / "BENCHMARKS.md"
        text = path.read_text()
        block = f"{BEGIN}\n{table}\n{END}"
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        path.write_text(text)
        print(f"written to {path}")


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def format_table(results: dict, teacher_top1: float, check: dict, a, minutes: float) -> str:
    lines = [f"| data | student top-1 | EMA top-1 | per seed (student) |", "|---|---:|---:|---|"]
    for label, runs in results.items():
        raw = [r["student_top1"] for r in runs]
        ema = [r["student_ema_top1"] for r in runs]
        lines.append(f"| {label} | {mean_std(raw)} | {mean_std(ema)} | {', '.join(f'{x:.1f}' for x in raw)} |")
    lines += [
        "",
        f"Student `{a.student}` at {a.img_size} px, {a.steps} steps of batch {a.batch_size} (AdamW, LR {a.lr}), "
        f"seeds {', '.join(map(str, a.seeds))}; teacher `{a.teacher}` trained on {a.classes * a.teacher_per_class} "
        f"labelled images of its own, {teacher_top1:.1f}% top-1; {a.classes} classes, {a.train_per_class} labelled "
        f"images per class for D1/D2, validation {a.classes * a.val_per_class} images. D3: {check['kept']} pool "
        f"images kept of {check['pool']} ({check['pool_no_class']} with no class), "
        f"{check['kept_correct'] / max(check['kept'], 1):.0%} of them under their true class, "
        f"{check['kept_no_class']} of no class; {check['repeated']} repeats fill short classes to {a.per_class}. "
        f"{minutes:.0f} minutes in all.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
