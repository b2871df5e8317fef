"""A fine-tuning schedule sized by the training set (`train.scale_schedule`, recipes/finetune_custom.yaml).

One recipe has to suit 300 images and 30,000: a fixed epoch count over-trains the first or under-trains the
second. The run aims at a number of optimizer steps, bounded by a least and a most epochs, and the keys that
follow from the run's length (warm-up, the no-augmentation tail, EMA ramp and decay, Mosaic) are derived
from it. Small sets train without the strong augmentations and Mosaic: the project's own small runs learn
faster without them (recipes/det_demo.yaml), and D-FINE / DEIM fine-tuning on small custom sets is
reported to end near zero AP with them on. The numbers' sources are in recipes/finetune_custom.yaml.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Optional

logger = logging.getLogger("distill")

TARGET_STEPS = 20_000  # optimizer steps a run aims at
MIN_EPOCHS, MAX_EPOCHS = 12, 200
MAX_WARMUP = 2000  # RT-DETRv2's warm-up and EMA ramp (steps)
WARMUP_EPOCHS = 3  # Ultralytics' warmup_epochs
TAIL_SHARE = 0.1  # the no-augmentation tail: Ultralytics' close_mosaic 10 of 100 epochs, D-FINE-S 12 of 132
STRONG_MIN_IMAGES = 1_000  # fewer: no strong augmentation at all
MOSAIC_MIN_IMAGES = 10_000  # fewer: no Mosaic
MOSAIC_PROB = 0.5  # DEIM's mosaic_prob
EMA_HORIZON_SHARE = 0.1  # the EMA averages over about this share of the run (det_demo: ~100 of 1200 steps)
EMA_DECAY_RANGE = (0.99, 0.9999)  # RT-DETRv2: 0.9999

# where each value goes in the recipe
KEYS = {"epochs": "train.epochs", "warmup_steps": "optim.warmup_steps", "no_aug_epochs": "train.no_aug_epochs",
        "mosaic_prob": "data.mosaic_prob", "ema_warmups": "train.ema_warmups", "ema_decay": "train.ema_decay"}


@dataclass(frozen=True)
class ScaledSchedule:
    epochs: float
    warmup_steps: int
    no_aug_epochs: float  # == epochs: no strong augmentation at all
    mosaic_prob: float
    ema_warmups: int
    ema_decay: float


def scaled_schedule(num_images: int, steps_per_epoch: int, steps: Optional[int] = None) -> ScaledSchedule:
    """The schedule for `num_images` training images at `steps_per_epoch` optimizer steps an epoch (`steps`:
    a run length given in steps, which the rest then follows); a pure function of its arguments, so a resumed
    run (same data, same batch) gets the same values."""
    per_epoch = max(1, int(steps_per_epoch))
    epochs = (steps / per_epoch if steps else
              float(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / per_epoch)))))
    total = steps or int(epochs * per_epoch)
    warmup = min(MAX_WARMUP, WARMUP_EPOCHS * per_epoch, total // 10)
    strong = num_images >= STRONG_MIN_IMAGES
    no_aug = float(min(epochs, max(1, round(TAIL_SHARE * epochs)))) if strong else float(epochs)
    horizon = EMA_HORIZON_SHARE * total
    decay = min(EMA_DECAY_RANGE[1], max(EMA_DECAY_RANGE[0], 1.0 - 1.0 / horizon))
    return ScaledSchedule(float(epochs), warmup, no_aug, MOSAIC_PROB if num_images >= MOSAIC_MIN_IMAGES else 0.0,
                          min(MAX_WARMUP, max(1, total // 10)), round(decay, 6))


def explicit_keys(argv) -> set[str]:
    """The keys of a command line's overrides, read as the configuration reads them (`--train.epochs=30` too):
    these win over the scaled values."""
    from distill.config import parse_overrides

    return {item.split("=", 1)[0] for item in parse_overrides(argv)[1]}


def apply_scaled_schedule(cfg, num_images: int, steps_per_epoch: int, explicit: set[str]) -> dict:
    """Writes the scaled values into `cfg` except where the command line set the key; logs one line of what
    it chose and returns {key: value} of what it wrote."""
    steps = int(cfg.train.steps) if cfg.train.steps else None  # a length in steps wins over the scaled epochs
    if steps is None and KEYS["epochs"] in explicit:  # so does one in epochs: the rest follow the run's length
        steps = max(1, math.ceil(float(cfg.train.epochs) * max(1, int(steps_per_epoch))))
    chosen = {KEYS[k]: v for k, v in asdict(scaled_schedule(num_images, steps_per_epoch, steps)).items()
              if KEYS[k] not in explicit and not (steps and k == "epochs")}
    for key, value in chosen.items():
        section, name = key.split(".")
        cfg[section][name] = value
    logger.info("schedule for %d training images (%d steps an epoch): %s", num_images, steps_per_epoch,
                ", ".join(f"{k}={v:g}" for k, v in chosen.items()))
    return chosen
