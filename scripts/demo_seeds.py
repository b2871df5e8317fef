"""The demo over several seeds: teacher, distilled student and labels-only baseline top-1 of each, as the README's
table (students by their EMA weights).

    python scripts/demo_seeds.py                 # seeds 0-3, one after another, about 6 minutes each on 2 cores
    python scripts/demo_seeds.py --seeds 1 2 --out runs/demo_seeds
    python scripts/demo_seeds.py --out runs/demo_lr data.batch_size=64 optim.lr=0.006    # the same with other keys

Each seed is `distill/pretrain.py recipe=demo train.seed=N` in a folder of its own under --out (resumed if it
stopped); the demo data is generated once under --data.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("runs/demo_seeds"))
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("keys", nargs="*", help="recipe keys for every seed, e.g. train.steps=600")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        if not (out / "summary.json").exists():
            subprocess.run([sys.executable, str(ROOT / "distill" / "pretrain.py"), "recipe=demo", f"train.seed={seed}",
                            f"output_dir={out}", f"data.root={args.data}", "resume=auto", *args.keys],
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        s = json.loads((out / "summary.json").read_text())
        teacher, student, baseline = s["teacher_top1"], s["student_ema_top1"], s["baseline_ema_top1"]
        rows.append(f"| {seed} | {teacher:.1f} | {student:.1f} ({100 * student / teacher:.1f}%) | {baseline:.1f} |")
    print("| `train.seed` | teacher | student, distilled | student, labels only |")
    print("|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
