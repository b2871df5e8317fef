"""Detection demo variants over several seeds: COCO AP and AP50 of each run (EMA weights) with their mean and
spread, as BENCHMARKS.md's tables. (Each run's wall time is in its summary.json, `wall_time_s`: comparable only
between runs that shared the machine alike.)

    python scripts/det_demo_seeds.py det_demo det_demo_dfine                    # seeds 0-2, one run after another
    python scripts/det_demo_seeds.py det_demo_dfine,train.steps=1100 --seeds 0 1  # keys after commas

Each run is `distill/finetune_det.py recipe=<recipe> <keys> train.seed=N` in a folder of its own under --out
(resumed if it stopped); the demo's data is generated once under --data.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_stats import spread  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(variant: str, seed: int, out: Path, data: Path) -> dict:
    recipe, *keys = variant.split(",")
    folder = out / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', variant)}_s{seed}"
    if not (folder / "summary.json").exists():
        subprocess.run([sys.executable, str(ROOT / "distill" / "finetune_det.py"), f"recipe={recipe}", *keys,
                        f"train.seed={seed}", f"output_dir={folder}", f"data.root={data}", "resume=auto"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return json.loads((folder / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="recipe name, then optional recipe keys after commas")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/det_demo_seeds"))
    parser.add_argument("--data", type=Path, default=Path("data/det_demo"))
    args = parser.parse_args()
    print("| variant | steps | AP per seed | AP, mean ± sd | AP50, mean ± sd |")
    print("|---|---:|---|---:|---:|")
    for variant in args.variants:
        runs = [run(variant, seed, args.out, args.data) for seed in args.seeds]
        ap, ap50 = [r["AP"] for r in runs], [r["AP50"] for r in runs]
        print(f"| `{variant}` | {runs[0]['steps']} | {' / '.join(f'{100 * a:.1f}' for a in ap)} | {spread(ap)} | "
              f"{spread(ap50)} |")


if __name__ == "__main__":
    main()
