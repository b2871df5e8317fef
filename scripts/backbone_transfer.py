"""Which pretraining makes the better detection backbone, on the demos' generated data: the detection demo
(recipes/det_demo.yaml) fine-tuned from a random MobileNetV4-Conv-S 0.35x and from the same network distilled by
its logits, its feature maps, or both (recipes/demo_feature.yaml, at equal pretraining steps), AP per seed with
its mean and each start's difference from the random one, paired by seed, with a 95% t-interval, as
BENCHMARKS.md's table.

    python scripts/backbone_transfer.py                       # seeds 0-4: 15 pretraining runs, 20 detection runs
    python scripts/backbone_transfer.py --seeds 2 --out runs/backbone_transfer

Seed N pretrains with train.seed=N and fine-tunes with train.seed=N. One teacher serves every pretraining run:
the first run fits it on the demo's labels (demo_feature's teacher.fit_steps) and the others read its
teacher.pt. Every run has a folder under --out and is skipped when its outcome is there, so a stopped
benchmark goes on where it stopped; runs use one thread each (OMP_NUM_THREADS=1), so results do not depend on
how many run side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_stats import paired_table, spread  # noqa: E402

from distill.engine.checkpoint import resolve_resume  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BACKBONE = "mobilenetv4_conv_small_035"  # det_demo's backbone
# Pretraining keys on top of recipes/demo_feature.yaml (feature maps only, on the images without classes):
# every variant sees the same views, and only its loss terms differ.
PRETRAINING = {
    "random": None,
    "logit": ["loss.kd_weight=1", "loss.feature_weight=0"],
    "feature": [],
    "logit+feature": ["loss.kd_weight=1"],
}


def python(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "distill" / script), *args],
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)


def pretrain(keys: list[str], seed: int, folder: Path, teacher: Path, data: Path) -> Path:
    """The pretrained student's last checkpoint; the first run fits the shared teacher and copies it to
    `teacher`."""
    if not (folder / "summary.json").exists():
        shared = [f"teacher.checkpoint={teacher}", "teacher.fit_steps=0"] if teacher.exists() else []
        python("pretrain.py", "recipe=demo_feature", f"student.name={BACKBONE}", *keys, *shared,
               f"train.seed={seed}", f"output_dir={folder}", f"data.root={data}", "resume=auto")
        if not teacher.exists():
            shutil.copy(folder / "teacher.pt", teacher)
    return resolve_resume("auto", folder)


def finetune(backbone: Path | None, seed: int, folder: Path, data: Path) -> dict:
    if not (folder / "summary.json").exists():
        keys = [f"model.backbone_checkpoint={backbone}"] if backbone else []
        python("finetune_det.py", "recipe=det_demo", *keys, f"train.seed={seed}", f"output_dir={folder}",
               f"data.root={data}", "resume=auto")
    return json.loads((folder / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/backbone_transfer"))
    parser.add_argument("--data", type=Path, default=Path("data"), help="where the demos' data is generated")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = args.out / "teacher.pt"
    results: dict[str, dict[int, dict]] = {name: {} for name in PRETRAINING}
    for seed in args.seeds:
        for name, keys in sorted(PRETRAINING.items(), key=lambda item: item[0] != "feature"):  # its teacher fit first
            slug = name.replace("+", "_")
            backbone = None if keys is None else pretrain(keys, seed, args.out / f"pre_{slug}_s{seed}", teacher,
                                                          args.data)
            results[name][seed] = finetune(backbone, seed, args.out / f"det_{slug}_s{seed}",
                                           args.data / "det_demo")
    print(paired_table({name: {s: r["AP"] for s, r in runs.items()} for name, runs in results.items()}, "random"))
    print("\n| backbone | AP50, mean ± sd |\n|---|---:|")
    for name, runs in results.items():
        print(f"| {name} | {spread([r['AP50'] for r in runs.values()])} |")


if __name__ == "__main__":
    main()
