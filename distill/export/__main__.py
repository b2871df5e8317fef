"""python -m distill.export RUN_DIR_OR_CKPT --out DIR [--to TARGET] [--weights ema|student] [target options]

The target defaults to the student's own library (timm / torchvision), or to ONNX for a detection run.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys

import yaml

from distill.cli import user_errors
from distill.errors import require
from distill.export.targets import DETECTOR_TARGETS, STUDENT_TARGETS, TARGETS, WEIGHTS, load_target


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m distill.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run folder (its newest checkpoint) or a checkpoint file")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--to", choices=sorted(TARGETS), help="default: timm / torchvision for a student, onnx for a detector")
    p.add_argument("--weights", choices=WEIGHTS, default="ema", help="which weights of the checkpoint (default: ema)")
    p.add_argument("--model", help="model name, for a plain state dict without the run's config")
    p.add_argument("--num-classes", type=int, help="class count, for a plain state dict")
    g = p.add_argument_group("rtdetr")
    g.add_argument("--det-recipe", help="detection recipe the written rtdetr.yaml starts from (default: the matching rtdetr_*)")
    g = p.add_argument_group("hf-rtdetr")
    g.add_argument("--arch", choices=("rtdetr", "rtdetr_v2"), default="rtdetr", help="transformers' RT-DETR or RT-DETRv2")
    g.add_argument("--num-labels", type=int, default=80)
    g.add_argument("--det-size", type=int,
                   help="the image processor's side (default: 640; a detection run's evaluation side)")
    g.add_argument("--freeze-bn", action="store_true",
                   help="freeze backbone batch norms with timm's freezing (keeps fused activations)")
    g.add_argument("--hf-set", action="append", default=[], metavar="KEY=VALUE",
                   help="any transformers config field, e.g. --hf-set d_model=128 (YAML values)")
    g = p.add_argument_group("onnx")
    g.add_argument("--img-size", type=int, help="the exported input side (default: the run's data.img_size)")
    g.add_argument("--opset", type=int, default=17)
    g.add_argument("--num-top", type=int, help="detections kept per image (default: the run's eval.num_top)")
    return p.parse_args(argv)


def target_options(fn, args) -> dict:
    """The parsed options `fn` takes, by parameter name."""
    options = dict(vars(args))
    options["hf_overrides"] = {}
    for item in args.hf_set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--hf-set {item!r} is not of the form KEY=VALUE")
        options["hf_overrides"][key] = yaml.safe_load(value)
    wanted = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in wanted and k not in ("run", "source", "out") and v is not None}


# optional packages a target needs: target -> (module, extra)
TARGET_EXTRAS = {"hf-rtdetr": ("transformers", "hf"), "hf-dfine": ("transformers", "hf")}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with user_errors():
        if args.to in TARGET_EXTRAS:
            module, extra = TARGET_EXTRAS[args.to]
            require(module, extra, f"--to {args.to}")
        try:
            return export(args)
        except ValueError as e:  # a checkpoint or target that does not fit the model (CheckpointMismatch included)
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None


def export(args) -> int:
    # imported once the arguments are parsed: --help and a wrong option need no torch
    from distill.export.onnx_detector import is_detection_source
    from distill.export.source import load_student
    from distill.models.factory import split_name

    if is_detection_source(args.source):
        to = args.to or "onnx"
        if to not in DETECTOR_TARGETS:
            raise ValueError(f"{args.source} is a detection run; it exports --to {', '.join(DETECTOR_TARGETS)}")
        fn = load_target(DETECTOR_TARGETS, to)
        written = fn(args.source, args.out, **target_options(fn, args))
    else:
        run = load_student(args.source, args.weights, args.model, args.num_classes)
        to = args.to or split_name(run.name)[0]
        if to not in STUDENT_TARGETS:
            raise ValueError(f"{args.source} is a pretraining run; it exports --to {', '.join(STUDENT_TARGETS)}")
        fn = load_target(STUDENT_TARGETS, to)
        written = fn(run, args.out, **target_options(fn, args))
    print(json.dumps({"format": to, "out": str(written)}))
    return 0


if __name__ == "__main__":
    main()
