"""Fine-tuning a small custom detection set from four starts, compared by paired differences over seeds, as
BENCHMARKS.md's "Fine-tuning a small custom set".

    python scripts/custom_transfer.py                         # seeds 0-4, then the frozen-backbone probe
    python scripts/custom_transfer.py --seeds 0 1 --steps 400 --img-size 128 --out runs/custom_transfer

The set is distill/data/custom_det.py's (YOLO layout, 300 training and 600 validation images of 128 px, four
object kinds the pretraining never drew). The starts, all MobileNetV4-Conv-S 0.35x in det_demo's RT-DETRv2:
  random    timm's initialisation
  logit     distilled by a teacher's logits on data.generate=demo_rich (56 classes of shapes, 4,480 images)
  feature   distilled by the same teacher's stride 8 / 16 / 32 maps on the same images
  detector  the whole detector first trained on det_demo's set (a stand-in for COCO pretraining): its
            backbone, encoder and decoder, the class-dependent tensors re-initialised (model.init_from)
The pretrainings are recipes/demo_feature.yaml on the richer set (one seed, --pretrain-seed): every fine-tuning
seed starts from the same pretrained weights, so the interval is over fine-tuning seeds. Fine-tuning seed N
(train.seed=N) draws the same batches and the same fresh detector tensors for every start.

Fine-tuning uses recipes/finetune_custom.yaml with det_demo's small detector (SMALL_DETECTOR) when the recipe
exists at launch, else det_demo's keys on the YOLO data.root; the recipe's name, steps and side name the runs' folder, so runs of one setting never mix with
another's.
Every run has a folder under --out and is skipped when its outcome is there: a stopped benchmark resumes.
Runs use one thread each (OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_stats import paired_table  # noqa: E402

from distill.data.custom_det import ensure_custom_det  # noqa: E402
from distill.engine.checkpoint import load_checkpoint, resolve_resume  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BACKBONE = "mobilenetv4_conv_small_035"  # det_demo's backbone
RICH_CLASSES = 56
PRETRAIN = ["recipe=demo_feature", f"student.name={BACKBONE}", f"student.num_classes={RICH_CLASSES}",
            "data.generate=demo_rich", "data.mix=demo_rich_unlabelled", "teacher.fit_mix=demo_rich",
            "teacher.fit_steps=300"]
LOSSES = {"logit": ["loss.kd_weight=1", "loss.feature_weight=0"], "feature": []}
STARTS = ("random", "logit", "feature", "detector")
# recipes/finetune_custom.yaml's detector is the full-size one; at this scale it takes det_demo's small detector,
# batch and learning rates (a random backbone learns nothing in minutes at the recipe's 1e-5), one evaluation
# at the end, and keeps the recipe's size-scaled warm-up, EMA and augmentation choices for the given steps.
SMALL_DETECTOR = [f"model.backbone={BACKBONE}", "model.pretrained_backbone=false", "model.pretrained_backbone=false", "model.hidden_dim=128",
                  "model.expansion=0.5", "model.num_queries=30", "model.num_decoder_layers=3", "model.num_heads=8", "model.num_points=4",
                  "model.dim_feedforward=256", "model.num_denoising=20", "data.global_batch_size=8",
                  "data.val_batch_size=50", "data.num_workers=1", "optim.lr=1e-3", "optim.backbone_lr=1e-3",
                  "train.eval_every=0", "eval.visualize=0"]


def python(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "distill" / script), *args],
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)


def pretrain(name: str, seed: int, out: Path, data: Path) -> Path:
    """The student's last checkpoint; the first run fits the shared teacher, the second reads its copy."""
    folder, teacher = out / f"pre_{name}", out / "teacher.pt"
    if not (folder / "summary.json").exists():
        shared = [f"teacher.checkpoint={teacher}", "teacher.fit_steps=0"] if teacher.exists() else []
        python("pretrain.py", *PRETRAIN, *LOSSES[name], *shared, f"train.seed={seed}", f"output_dir={folder}",
               f"data.root={data}", "resume=auto")
    if not teacher.exists():
        shutil.copy(folder / "teacher.pt", teacher)
    return resolve_resume("auto", folder)


def source_detector(out: Path, data: Path, steps: int) -> tuple[Path, Path]:
    """(best.pt, its backbone alone) of det_demo trained on its own set: the pretrained-detector start."""
    folder = out / "det_demo_source"
    if not (folder / "summary.json").exists():
        python("finetune_det.py", "recipe=det_demo", f"train.steps={steps}", "train.seed=0",
               f"output_dir={folder}", f"data.root={data / 'det_demo'}", "resume=auto")
    backbone = folder / "backbone.pt"
    if not backbone.exists():  # model.backbone_checkpoint reads a plain state dict of the extractor's keys
        state = load_checkpoint(folder / "best.pt")["ema"]
        torch.save({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, backbone)
    return folder / "best.pt", backbone


def finetune(recipe: str, keys: list[str], seed: int, folder: Path) -> float:
    if not (folder / "summary.json").exists():
        python("finetune_det.py", f"recipe={recipe}", *keys, f"train.seed={seed}", f"output_dir={folder}",
               "resume=auto")
    return json.loads((folder / "summary.json").read_text())["AP"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps (batch 8: 16 epochs of 300)")
    parser.add_argument("--img-size", type=int, default=96, help="fine-tuning side (the images are 128 px)")
    parser.add_argument("--source-steps", type=int, default=500, help="det_demo steps of the detector start")
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--recipe", default=None, help="default: finetune_custom if it exists, else det_demo")
    parser.add_argument("--out", type=Path, default=Path("runs/custom_transfer"))
    parser.add_argument("--data", type=Path, default=Path("data"), help="where the generated sets are written")
    parser.add_argument("--no-probe", action="store_true")
    args = parser.parse_args()
    recipe = args.recipe or ("finetune_custom" if (ROOT / "recipes" / "finetune_custom.yaml").exists()
                             else "det_demo")
    args.out.mkdir(parents=True, exist_ok=True)
    custom = ensure_custom_det(args.data / "custom_det")
    backbones = {name: pretrain(name, args.pretrain_seed, args.out, args.data) for name in ("feature", "logit")}
    best, source_backbone = source_detector(args.out, args.data, args.source_steps)
    start_keys = {
        "random": [],
        "logit": [f"model.backbone_checkpoint={backbones['logit']}"],
        "feature": [f"model.backbone_checkpoint={backbones['feature']}"],
        "detector": [f"model.backbone_checkpoint={source_backbone}", f"model.init_from={best}"],
    }
    common = [f"data.root={custom}", f"data.img_size={args.img_size}", f"train.steps={args.steps}",
              f"train.ckpt_every={args.steps}"]
    if recipe == "det_demo":  # its keys on the custom set, without its generated data
        common += ["data.generate=null", "eval.visualize=0"]
    elif recipe == "finetune_custom":
        common += SMALL_DETECTOR
    runs = args.out / f"{recipe}_{args.steps}steps_{args.img_size}px"  # one folder per fine-tuning setting
    results: dict[str, dict[int, float]] = {name: {} for name in STARTS}
    for seed in args.seeds:  # seed-major: a stopped benchmark leaves whole pairs
        for name in STARTS:
            results[name][seed] = finetune(recipe, common + start_keys[name], seed,
                                           runs / f"ft_{name}_s{seed}")
        print(paired_table(results, "random"), flush=True)
    table = paired_table(results, "random")
    (runs / "table.md").write_text(table + "\n")
    print(table)
    if not args.no_probe:
        from localisation_probe import probe_table  # noqa: E402 (torch work only when asked)

        print(probe_table({"random": None, **backbones, "detector": source_backbone}, custom,
                          args.out / "probe.json"))


if __name__ == "__main__":
    main()
