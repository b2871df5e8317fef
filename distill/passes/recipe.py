"""Recipes of the two passes that run a model over data before a student trains: curation (`curate_*.yaml`)
and offline labelling (`label_*.yaml`). Typed schemas, filled by the YAML and overridden by `key=value`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig

from distill.config import (
    BATCH,
    COMPILE_MODES,
    MAX_CLASSES,
    MEAN_STD,
    RECIPE_DIR,
    SEED,
    TIMEOUT,
    SIDE,
    WORKERS,
    ClusterConfig,
    ConfigError,
    Range,
    above,
    at_least,
    load_config,
)


@dataclass
class FrozenModelConfig:
    """A classifier that only runs forward: the curation scorer or the labelling teacher."""

    name: str = "efficientnet_b0.ra_in1k"  # timm name or `torchvision/<name>`
    pretrained: bool = True  # hub weights (network access needed)
    checkpoint: Optional[str] = None  # a local checkpoint instead of hub weights
    num_classes: int = 1000
    img_size: Optional[int] = None  # default: the model's own pretrained input size
    interpolation: Optional[str] = None  # resizing the view to img_size; default: the model's own (timm config)
    mean: Optional[list[float]] = None  # default: the model's own normalisation
    std: Optional[list[float]] = None
    channels_last: Optional[bool] = None  # null: on where CUDA is
    compile: bool = False  # compiled for inference (compile_mode: torch.compile's mode)
    compile_mode: Optional[str] = None
    # With no weights at all, train the model on the labels of this mix first (the embedded demos);
    # 0 refuses to run a random model.
    fit_steps: int = 0
    fit_lr: float = 0.002
    fit_mix: str = "demo"
    fit_img_size: int = 64
    fit_batch_size: int = 64


# --------------------------------------------------------------------------------------------------
# Curation: class-balanced extra data (the paper's D3)
# --------------------------------------------------------------------------------------------------


@dataclass
class PoolConfig:
    shards: Optional[str] = None  # webdataset shards: brace pattern or folder, relative to `data_root`
    folder: Optional[str] = None  # or an image folder (searched recursively), relative to `data_root`
    folder_chunk: int = 1000  # images of a folder per unit of work (shards are units as they are)
    num_images: Optional[int] = None  # the pool's size, for a dry run where its shards are not at hand


@dataclass
class SelectConfig:
    threshold: float = 0.3  # keep an image when its top-class probability is above this
    per_class: int = 130_000  # K: the most confident K per class are kept
    fill: str = "repeat"  # classes with fewer than K: repeat their images up to K, or leave them short
    hist_bins: int = 20  # bins of the per-class confidence histogram in the report


@dataclass
class CurateConfig:
    recipe: str = ""
    data_root: str = "data"  # pool paths and a relative output_dir resolve against this
    generate: Optional[str] = None  # "demo": generate the demo datasets under `data_root` if missing
    output_dir: Optional[str] = None  # relative to data_root; default: the recipe's name. Shards + report
    maxcount: int = 1000  # samples per output shard
    quality: int = 95  # JPEG quality for pool images that are not JPEG already (JPEGs are copied as is)
    pool: PoolConfig = field(default_factory=PoolConfig)
    scorer: FrozenModelConfig = field(default_factory=FrozenModelConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    crop_pct: Optional[float] = None  # eval centre crop; default: the scorer's own
    batch_size: int = 256  # images scored per forward pass, per process
    num_workers: int = 8  # decoding workers per process
    precision: str = "auto"  # auto (bf16 where supported), no, bf16, fp16
    checkpoint_every: int = 20  # units (shards / folder chunks) between progress checkpoints
    seed: int = 0  # order of the fill copies
    dry_run: Optional[int] = None  # N: print the pass's plan as if on N processes and exit, reading no images
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


CURATE_CHOICES = {
    "select.fill": ("repeat", "short"),
    "precision": ("auto", "no", "bf16", "fp16"),
    "generate": (None, "demo"),
    "scorer.interpolation": (None, "bilinear", "bicubic"),
    "scorer.compile_mode": COMPILE_MODES,
}


def frozen_model_ranges(role: str) -> dict[str, Range]:
    return {
        f"{role}.num_classes": at_least(1, MAX_CLASSES),
        f"{role}.img_size": SIDE,
        f"{role}.mean": MEAN_STD,
        f"{role}.std": MEAN_STD,
        f"{role}.fit_steps": at_least(0),
        f"{role}.fit_lr": above(0),
        f"{role}.fit_img_size": SIDE,
        f"{role}.fit_batch_size": BATCH,
    }


JPEG_QUALITY = at_least(1, 100)
CURATE_RANGES = {
    "maxcount": at_least(1),
    "quality": JPEG_QUALITY,
    "pool.folder_chunk": at_least(1),
    **frozen_model_ranges("scorer"),
    "select.threshold": Range(0.0, 1.0, hi_open=True),
    "select.per_class": at_least(1),
    "select.hist_bins": at_least(1, 10_000),
    "crop_pct": above(0, 1),
    "batch_size": BATCH,
    "num_workers": WORKERS,
    "checkpoint_every": at_least(1),
    "seed": SEED,
    "cluster.timeout_s": TIMEOUT,
}


def load_curate_config(argv: Sequence[str], recipe_dir: Path = RECIPE_DIR) -> DictConfig:
    cfg = load_config(CurateConfig, argv, recipe_dir, CURATE_CHOICES, CURATE_RANGES)
    if bool(cfg.pool.shards) == bool(cfg.pool.folder):
        raise ConfigError("give the image pool as exactly one of pool.shards=SPEC or pool.folder=PATH")
    cfg.output_dir = under_root(cfg.data_root, cfg.output_dir or Path(cfg.recipe).stem)
    return cfg


# --------------------------------------------------------------------------------------------------
# Offline labelling: stored views with the teacher's top-k distribution
# --------------------------------------------------------------------------------------------------


@dataclass
class ViewConfig:
    img_size: int = 224  # side of the stored views: the student's training resolution
    replicas: int = 1  # augmented views stored per image (R), per source unless `replicas_per_source` says
    replicas_per_source: dict[str, int] = field(default_factory=dict)
    quality: int = 90  # JPEG quality of the stored views; the teacher labels the decoded JPEG
    # full: the teacher's whole distribution, float16 (the paper's; 2 bytes a class). topk: its `topk` most
    # probable classes (float16 + int16 indices), the left-over mass spread evenly over the other classes
    # when training reads them (as TinyViT does).
    targets: str = "full"
    topk: int = 10
    meta: bool = False  # also store {src, replica, partner, lam} per view as `json` (+1 KB per view in tar)


@dataclass
class LabelConfig:
    recipe: str = ""
    mix: str = "mnv4"  # data_mixes/NAME.yaml or a path: every source of it gets views
    sources: list[str] = field(default_factory=list)  # a subset of the mix's sources (default: all)
    data_root: str = "data"  # the mix's relative shard paths resolve against this
    generate: Optional[str] = None  # "demo": generate the demo dataset under `data_root` if missing
    output_dir: Optional[str] = None  # relative to data_root; default: the recipe's name. A folder per source
    offline_mix: Optional[str] = None  # also write this mix file, pointing at the views (flip, same weights)
    teacher: FrozenModelConfig = field(default_factory=FrozenModelConfig)
    view: ViewConfig = field(default_factory=ViewConfig)
    batch_size: int = 128  # views labelled per forward pass, per process
    num_workers: int = 8
    precision: str = "auto"
    seed: int = 0
    # Images of each source, for a dry run where the source's shards (and manifest) are not at hand
    source_images: dict[str, int] = field(default_factory=dict)
    dry_run: Optional[int] = None  # N: print the pass's plan as if on N processes and exit, reading no images
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


LABEL_CHOICES = {"precision": ("auto", "no", "bf16", "fp16"), "generate": (None, "demo"),
                 "view.targets": ("full", "topk"), "teacher.interpolation": (None, "bilinear", "bicubic"),
                 "teacher.compile_mode": COMPILE_MODES}


LABEL_RANGES = {
    **frozen_model_ranges("teacher"),
    "view.img_size": SIDE,
    "view.replicas": at_least(1, 10_000),
    "view.replicas_per_source": at_least(1, 10_000),
    "view.quality": JPEG_QUALITY,
    "view.topk": at_least(1),
    "batch_size": BATCH,
    "num_workers": WORKERS,
    "seed": SEED,
    "cluster.timeout_s": TIMEOUT,
}


def load_label_config(argv: Sequence[str], recipe_dir: Path = RECIPE_DIR) -> DictConfig:
    cfg = load_config(LabelConfig, argv, recipe_dir, LABEL_CHOICES, LABEL_RANGES)
    if cfg.view.targets == "topk" and cfg.view.topk > cfg.teacher.num_classes:
        raise ConfigError(f"view.topk={cfg.view.topk} exceeds teacher.num_classes={cfg.teacher.num_classes}")
    cfg.output_dir = under_root(cfg.data_root, cfg.output_dir or Path(cfg.recipe).stem)
    return cfg


def under_root(root: str, path) -> str:
    """Outputs of the passes are data: a relative path lands under the data root, where mixes find it."""
    path = Path(path)
    return str(path if path.is_absolute() else Path(root) / path)
