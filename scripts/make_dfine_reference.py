"""Write tests/data/dfine_reference.pt: what the official D-FINE decoder and criterion (and DEIM's criterion,
for its matchability-aware loss) compute on fixed inputs, so that tests/test_det_dfine_fidelity.py can check
this project's D-FINE head against them without the official code.

    git clone https://github.com/Peterande/D-FINE /tmp/D-FINE     # the fixture was made at 4a1f73a8
    git clone https://github.com/ShihuaHuang95/DEIM /tmp/DEIM     # and at a9aa4adc
    python scripts/make_dfine_reference.py /tmp/D-FINE /tmp/DEIM [--out tests/data/dfine_reference.pt]

Not run in CI. It imports the official `src/zoo/dfine` and `engine/deim` modules directly (their registries
and distributed helpers are replaced by stand-ins; nothing else of either package is loaded) and needs only
torch, torchvision and scipy. What it does:

1. builds the official `DFINETransformer` at a tiny size (width 32, 4 heads, 3 layers, 10 queries, two
   levels of 8x8 and 4x4 with 3 and 2 sampling points, 6 denoising queries, reg_max 32, reg_scale 4) with
   its own initialisation (seed 0), then adds seeded noise to every trained tensor so that no head stays at
   its zero initialisation, and rounds the weights to float16 values (stored in float16, exactly);
2. draws the decoder inputs (the encoder's two feature maps, seed 2) and fixes the targets (three images
   holding 3, 0 and 1 boxes);
3. runs the training forward after `torch.manual_seed(DN_SEED)` (the denoising noise), the official
   `DFINECriterion` (losses vfl, boxes, local; weights vfl 1, bbox 5, giou 2, fgl 0.15, ddf 1.5; alpha
   0.75, gamma 2; the official matcher with costs 2 / 5 / 2, focal alpha 0.25, gamma 2) and the eval
   forward;
4. back-propagates the sum of D-FINE's losses and keeps each weight's gradient norm and sum;
5. runs DEIM's `DEIMCriterion` on the same outputs (a second forward with the same seed) with DEIM's loss
   settings (losses mal, boxes, local; weights mal 1, bbox 5, giou 2, fgl 0.15, ddf 1.5; gamma 1.5);
6. saves weights, inputs, every output tensor (named as this project's head names them) and every loss.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import types
from pathlib import Path

import torch

CONFIG = dict(num_classes=3, hidden_dim=32, num_queries=10, strides=[16, 32], points_per_level=[3, 2],
              num_heads=4, num_layers=3, dim_feedforward=64, num_denoising=6, reg_max=32, reg_scale=4.0)
MAP_SIZES = [(8, 8), (4, 4)]  # a 128 x 128 image at strides 16 and 32
WEIGHT_SEED, INPUT_SEED, DN_SEED = 1, 2, 3
TARGETS = [
    {"labels": [2, 0, 1], "boxes": [[0.30, 0.40, 0.20, 0.30], [0.62, 0.55, 0.40, 0.50], [0.80, 0.20, 0.15, 0.12]]},
    {"labels": [], "boxes": []},
    {"labels": [1], "boxes": [[0.50, 0.50, 0.60, 0.70]]},
]
LOSS_WEIGHTS = {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2, "loss_fgl": 0.15, "loss_ddf": 1.5}
DEIM_LOSS_WEIGHTS = {"loss_mal": 1, "loss_bbox": 5, "loss_giou": 2, "loss_fgl": 0.15, "loss_ddf": 1.5}


def _package(name: str, path: Path | None = None) -> types.ModuleType:
    """An empty package (its __init__ not run: the official ones import the whole training stack)."""
    module = types.ModuleType(name)
    if path is not None:
        module.__path__ = [str(path)]
    sys.modules[name] = module
    return module


def _stand_ins(top: str, root: Path) -> None:
    _package(top, root)
    _package(f"{top}.core").register = lambda *args, **kwargs: (lambda cls: cls)
    _package(f"{top}.misc", root / "misc")
    dist_utils = _package(f"{top}.misc.dist_utils")
    dist_utils.get_world_size = lambda: 1
    dist_utils.is_dist_available_and_initialized = lambda: False


def import_reference(root: Path):
    """D-FINE's decoder, criterion and matcher modules."""
    _stand_ins("src", root / "src")
    _package("src.zoo", root / "src/zoo")
    _package("src.zoo.dfine", root / "src/zoo/dfine")
    names = ("dfine_decoder", "dfine_criterion", "matcher")
    return [importlib.import_module(f"src.zoo.dfine.{name}") for name in names]


def import_deim_criterion(root: Path):
    _stand_ins("engine", root / "engine")
    _package("engine.deim", root / "engine/deim")
    return importlib.import_module("engine.deim.deim_criterion")


def build_reference(decoder_module):
    c = CONFIG
    torch.manual_seed(0)
    model = decoder_module.DFINETransformer(
        num_classes=c["num_classes"], hidden_dim=c["hidden_dim"], num_queries=c["num_queries"],
        feat_channels=[c["hidden_dim"]] * 2, feat_strides=list(c["strides"]), num_levels=2,
        num_points=list(c["points_per_level"]), nhead=c["num_heads"], num_layers=c["num_layers"],
        dim_feedforward=c["dim_feedforward"], num_denoising=c["num_denoising"], reg_max=c["reg_max"],
        reg_scale=c["reg_scale"])
    noise = torch.Generator().manual_seed(WEIGHT_SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:  # up and reg_scale: constants
                continue
            fan_in = p.shape[1] if p.ndim > 1 else 1
            scale = 1 / fan_in ** 0.5 if p.ndim > 1 else 0.1
            p.add_(torch.randn(p.shape, generator=noise) * scale)
            p.copy_(p.half().float())  # exactly representable in the float16 fixture
    return model


def flatten(outputs: dict) -> dict[str, torch.Tensor]:
    """The official training outputs under this project's names (`enc_aux_outputs` → `enc_outputs`); the
    teacher copies inside each auxiliary output are the last layer's and are left out."""
    renamed = {"enc_aux_outputs": "enc_outputs"}
    flat = {}
    for key, value in outputs.items():
        key = renamed.get(key, key)
        if torch.is_tensor(value) and key in ("pred_logits", "pred_boxes", "pred_corners", "ref_points"):
            flat[key] = value.detach().clone()
        elif isinstance(value, dict) and key.endswith("pre_outputs"):
            flat.update({f"{key}.{k}": v.detach().clone() for k, v in value.items()})
        elif isinstance(value, list) and key in ("aux_outputs", "enc_outputs", "dn_outputs"):
            for i, layer in enumerate(value):
                flat.update({f"{key}.{i}.{k}": v.detach().clone() for k, v in layer.items()
                             if k in ("pred_logits", "pred_boxes", "pred_corners", "ref_points")})
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dfine", type=Path, help="a checkout of github.com/Peterande/D-FINE")
    parser.add_argument("deim", type=Path, help="a checkout of github.com/ShihuaHuang95/DEIM")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "tests/data/dfine_reference.pt")
    args = parser.parse_args()
    decoder_module, criterion_module, matcher_module = import_reference(args.dfine.resolve())
    deim_module = import_deim_criterion(args.deim.resolve())

    model = build_reference(decoder_module)
    generator = torch.Generator().manual_seed(INPUT_SEED)
    feats = [torch.randn(len(TARGETS), CONFIG["hidden_dim"], h, w, generator=generator) for h, w in MAP_SIZES]
    targets = [{"labels": torch.tensor(t["labels"], dtype=torch.long),
                "boxes": torch.tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)} for t in TARGETS]

    model.train()
    torch.manual_seed(DN_SEED)
    outputs = model(feats, [dict(t) for t in targets])
    flat = flatten(outputs)
    matcher = matcher_module.HungarianMatcher({"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}, use_focal_loss=True,
                                              alpha=0.25, gamma=2.0)
    criterion = criterion_module.DFINECriterion(matcher, LOSS_WEIGHTS, ["vfl", "boxes", "local"], alpha=0.75,
                                                gamma=2.0, num_classes=CONFIG["num_classes"], reg_max=CONFIG["reg_max"])
    losses = criterion(outputs, [dict(t) for t in targets])
    model.zero_grad()
    sum(losses.values()).backward()
    # which tensors learn from which loss (detached paths included) shows in the gradients: their norm and
    # sum per tensor are enough to tell, and small
    learned = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    gradients = {"names": [name for name, _ in learned],
                 "norm_and_sum": torch.stack([torch.stack([g.norm(), g.sum()]) for _, g in learned])}
    losses = {k: v.detach().clone().reshape(()) for k, v in losses.items()}
    torch.manual_seed(DN_SEED)
    outputs_again = model(feats, [dict(t) for t in targets])
    deim = deim_module.DEIMCriterion(matcher, DEIM_LOSS_WEIGHTS, ["mal", "boxes", "local"], gamma=1.5,
                                     num_classes=CONFIG["num_classes"], reg_max=CONFIG["reg_max"])
    deim_losses = {k: v.detach().clone().reshape(())
                   for k, v in deim(outputs_again, [dict(t) for t in targets]).items()}
    model.eval()
    with torch.no_grad():
        evaluated = model(feats)

    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    def commit(checkout: Path) -> str:
        done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
        return done.stdout.strip() or "unknown"
    fixture = {
        "config": CONFIG,
        "seeds": {"weights": WEIGHT_SEED, "inputs": INPUT_SEED, "denoising": DN_SEED},
        "reference": {"github.com/Peterande/D-FINE": commit(args.dfine),
                      "github.com/ShihuaHuang95/DEIM": commit(args.deim), "torch": str(torch.__version__)},
        # trained tensors in float16 (their values are float16's), constants and buffers as they are
        "weights": {k: v.half() if k in trained else v for k, v in model.state_dict().items()},
        "feats": feats,
        "targets": targets,
        "train_outputs": flat,
        "num_denoising": int(outputs["dn_meta"]["dn_num_split"][0]),
        "losses": losses,
        "gradients": gradients,
        "deim_losses": deim_losses,
        "eval_outputs": {k: v.clone() for k, v in evaluated.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    print(f"{args.out}: {len(fixture['weights'])} tensors, {len(flat)} outputs, {len(losses)} losses, "
          f"{args.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
