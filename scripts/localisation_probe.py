"""A frozen-backbone localisation probe: how well a backbone's stride-8 and stride-16 maps, read by a linear
(1x1) head alone, say where each kind of object is on a YOLO-layout set (scripts/custom_transfer.py's).

The maps (stride 16 upsampled to stride 8, each channel standardised on the training images) feed one
logistic regression per class over the cells of the stride-8 grid; a cell is positive for a class when its
centre lies inside a box of that class (a coarse mask of the boxes: an object's centre alone is not a local
question a 1x1 head can answer). Fitted on the training split (full batch, Adam, fixed steps and
seed), scored on the validation split as the average precision of the cells' scores, averaged over classes
("box-cell mAP"). Nothing but the head learns, so the score is the backbone's: a deterministic reading on
the CPU in well under a minute, free of the detector's seed-to-seed spread.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from distill.models.features import create_feature_extractor

BACKBONE = "mobilenetv4_conv_small_035"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the detector's input normalisation (ImageNet)
STEPS, LR, SEED = 300, 0.05, 0


def read_split(data_yaml: Path, split: str) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Images (N, 3, H, W) normalised, and per image its `class cx cy w h` rows (normalised)."""
    spec = yaml.safe_load(data_yaml.read_text())
    folder = data_yaml.parent / spec.get("path", ".") / spec[split]
    files = sorted(folder.glob("*.jpg"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.float32) / 255
    images = (images - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    labels = []
    for f in files:
        text = Path(str(f).replace("/images/", "/labels/")).with_suffix(".txt").read_text()
        labels.append(np.asarray([[float(v) for v in line.split()] for line in text.splitlines() if line.strip()],
                                 np.float32).reshape(-1, 5))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, C8 + C16, H/8, W/8): the stride-8 map and the stride-16 map upsampled beside it."""
    out = []
    for batch in images.split(100):
        s8, s16 = model(batch)[:2]
        out.append(torch.cat([s8, F.interpolate(s16, size=s8.shape[-2:], mode="nearest")], 1))
    return torch.cat(out)


def box_targets(labels: list[np.ndarray], num_classes: int, grid: int) -> torch.Tensor:
    """(N, classes, grid, grid): 1 where the cell's centre is inside a box of that class."""
    centres = (torch.arange(grid) + 0.5) / grid
    target = torch.zeros(len(labels), num_classes, grid, grid)
    for i, rows in enumerate(labels):
        for c, cx, cy, w, h in rows:
            inside_y = ((centres - cy).abs() <= h / 2).float()
            inside_x = ((centres - cx).abs() <= w / 2).float()
            target[i, int(c)] = torch.maximum(target[i, int(c)], inside_y[:, None] * inside_x[None, :])
    return target


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / max(hits.sum(), 1.0))


def probe(checkpoint: Optional[Path], data_yaml: Path) -> float:
    """Box-cell mAP of a linear head on the frozen backbone (`checkpoint` None: timm's random init, seeded)."""
    torch.manual_seed(SEED)
    model = create_feature_extractor(BACKBONE, checkpoint=str(checkpoint) if checkpoint else None,
                                     out_strides=(8, 16)).eval()
    num_classes = len(yaml.safe_load(data_yaml.read_text())["names"])
    splits = {}
    for split in ("train", "val"):
        images, labels = read_split(data_yaml, split)
        feats = features(model, images)
        splits[split] = (feats, box_targets(labels, num_classes, feats.shape[-1]))
    train_x, train_y = splits["train"]
    mean, std = train_x.mean((0, 2, 3), keepdim=True), train_x.std((0, 2, 3), keepdim=True) + 1e-6
    head = torch.nn.Conv2d(train_x.shape[1], num_classes, 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=LR)
    pos_weight = ((1 - train_y.mean((0, 2, 3))) / train_y.mean((0, 2, 3)).clamp_min(1e-6)).view(-1, 1, 1)
    x = (train_x - mean) / std
    for _ in range(STEPS):
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(head(x), train_y, pos_weight=pos_weight).backward()
        optimizer.step()
    val_x, val_y = splits["val"]
    with torch.no_grad():
        scores = head((val_x - mean) / std)
    return float(np.mean([average_precision(scores[:, c].flatten().numpy(), val_y[:, c].flatten().numpy())
                          for c in range(num_classes)]))


def probe_table(checkpoints: dict[str, Optional[Path]], data_yaml: Path, record: Path) -> str:
    """A Markdown table of each backbone's box-cell mAP, kept in `record` (JSON) so done rows are skipped."""
    done = json.loads(record.read_text()) if record.exists() else {}
    for name, checkpoint in checkpoints.items():
        if name not in done:
            done[name] = probe(checkpoint, data_yaml)
            record.write_text(json.dumps(done, indent=1))
    lines = ["| backbone (frozen) | box-cell mAP, val |", "|---|---:|"]
    lines += [f"| {name} | {100 * done[name]:.1f} |" for name in checkpoints]
    return "\n".join(lines)
