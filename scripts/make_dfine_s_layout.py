"""Write tests/data/dfine_s_layout.json: the name and shape of every encoder and decoder tensor that the
official D-FINE code's model classes hold at D-FINE-S's size, so that tests can check, key by key and without
the official code, that this project writes and reads official D-FINE-S checkpoints.

    git clone https://github.com/Peterande/D-FINE /tmp/D-FINE     # the fixture was made at 4a1f73a8
    python scripts/make_dfine_s_layout.py /tmp/D-FINE [--out tests/data/dfine_s_layout.json]

Not run in CI. Like scripts/make_dfine_reference.py it imports the official `src/zoo/dfine` modules directly
(registry and distributed helpers replaced by stand-ins) and needs only torch. It builds the official
`HybridEncoder` and `DFINETransformer` with configs/dfine/dfine_hgnetv2_s_coco.yml's settings on top of
include/dfine_hgnetv2.yml's (HGNetv2-B0's channels 256 / 512 / 1024 at strides 8 / 16 / 32, width 256,
expansion 0.5, depth 0.34, 3 decoder layers, [3, 6, 3] points, reg_max 32, reg_scale 4, 80 classes, evaluation
side 640) and records their state dicts under the `encoder.` / `decoder.` prefixes the official `DFINE` model
gives them. The backbone (HGNetv2-B0) is left out: this project's detectors bring their own. No weights are
stored, only names and shapes (a few tens of KiB).
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_dfine_reference import _package, _stand_ins  # noqa: E402  (the same stand-ins for the official package)

ENCODER = dict(in_channels=[256, 512, 1024], feat_strides=[8, 16, 32], hidden_dim=256, nhead=8, dim_feedforward=1024,
               dropout=0.0, enc_act="gelu", use_encoder_idx=[2], num_encoder_layers=1, expansion=0.5,
               depth_mult=0.34, act="silu", eval_spatial_size=[640, 640])
DECODER = dict(num_classes=80, hidden_dim=256, num_queries=300, feat_channels=[256, 256, 256], feat_strides=[8, 16, 32],
               num_levels=3, num_points=[3, 6, 3], nhead=8, num_layers=3, dim_feedforward=1024, dropout=0.0,
               num_denoising=100, label_noise_ratio=0.5, box_noise_scale=1.0, eval_spatial_size=[640, 640],
               eval_idx=-1, reg_max=32, reg_scale=4.0, layer_scale=1, cross_attn_method="default",
               query_select_method="default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dfine", type=Path, help="a checkout of github.com/Peterande/D-FINE")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "tests/data/dfine_s_layout.json")
    args = parser.parse_args()
    root = args.dfine.resolve()
    _stand_ins("src", root / "src")
    _package("src.zoo", root / "src/zoo")
    _package("src.zoo.dfine", root / "src/zoo/dfine")
    encoder = importlib.import_module("src.zoo.dfine.hybrid_encoder").HybridEncoder(**ENCODER)
    decoder = importlib.import_module("src.zoo.dfine.dfine_decoder").DFINETransformer(**DECODER)
    shapes = {f"{prefix}.{key}": list(value.shape)
              for prefix, module in (("encoder", encoder), ("decoder", decoder))
              for key, value in module.state_dict().items()}
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    fixture = {"reference": {"github.com/Peterande/D-FINE": commit.stdout.strip() or "unknown"},
               "encoder": ENCODER, "decoder": DECODER, "backbone": "HGNetv2-B0, left out", "shapes": shapes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # one line per setting and per tensor: readable, and a changed layout shows as a short diff
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in fixture.items() if k != "shapes"]
    lines.append(' "shapes": {\n' + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in shapes.items())
                 + "\n }")
    args.out.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"{args.out}: {len(shapes)} tensors, {args.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
