"""The detection fine-tuning recipe: a typed schema, filled by `recipes/NAME.yaml`, overridden by `key=value`.

Defaults are RT-DETRv2's (the R18-sized neck and decoder, its optimiser and augmentation schedule); the
`rtdetr_*` recipes only name the backbone and what differs per size. DEIM's training (Mosaic, batch MixUp,
the flat-then-cosine LR, a late start of the strong augmentations) is off by default: `deim_base` and the
`dfine_<backbone>` recipes turn it on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig

from distill.config import (
    BATCH,
    FRACTION,
    MAX_CLASSES,
    PRETRAIN_CHOICES,
    PROBABILITY,
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
from distill.data.formats import FORMATS as DATA_FORMATS
from distill.detection.settings import (
    ATTENTION_LEVEL,
    CEILING_FACTOR,
    CLASSIFICATION_LOSSES,
    HEADS,
    SCHEDULES,
    RTDETRConfig,
    check_head,
    weight_ceiling,
)


@dataclass
class DetModelConfig(RTDETRConfig):
    """`RTDETRConfig` as a recipe sets it: the same fields, with recipe-friendly defaults and types."""

    backbone: str = "mobilenetv4_conv_small"  # timm name or `torchvision/<name>`
    num_classes: Optional[int] = None  # default: the training data's class count (given, it must agree)
    out_strides: list[int] = field(default_factory=lambda: [8, 16, 32])  # [16, 32]: the two-level light neck
    eval_spatial_size: Optional[list[int]] = None
    num_points_per_level: Optional[list[int]] = None  # head=dfine: e.g. [3, 6, 3]; None: num_points everywhere


@dataclass
class DetDataConfig:
    # the data: a COCO folder (the four paths below are relative to it), a YOLO dataset YAML (or its folder),
    # or a Roboflow / CVAT / Label Studio COCO export folder (distill.data.det_layouts)
    root: str = "data/coco"
    format: str = "auto"  # auto (from the files under root) | coco | yolo | roboflow | cvat | labelstudio
    train_images: str = "train2017"
    train_ann: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_ann: str = "annotations/instances_val2017.json"
    generate: Optional[str] = None  # "det_demo": generate the shapes dataset under `root` if missing
    img_size: int = 640  # evaluation side, and the training side when `multiscale` is empty
    multiscale: list[int] = field(default_factory=list)  # training sides, each process draws one per batch
    batch_size: int = 4  # per process
    global_batch_size: Optional[int] = None  # when set, batch_size = global / (processes x grad_accum)
    val_batch_size: int = 8
    num_workers: int = 4
    # DEIM's dense one-to-one matching: more targets per image. Off by default (RT-DETRv2 has neither); the
    # numbers are DEIM's (configs/base/deim.yml). Epoch windows are [start, stop): the augmentation is drawn
    # in epochs start <= e < stop; [] means while the strong augmentations are on.
    # Mosaic: four images (this one and three drawn from the whole set) scaled to `mosaic_size` on their
    # shorter side, one per quadrant of a 2x2 canvas, then one random affine of the canvas; such a sample skips
    # zoom-out and IoU crop (photometric, flip and resize still apply), as DEIM's
    mosaic_prob: float = 0.0  # share of samples made mosaics (DEIM: 0.5, `mosaic_prob`); 0: off
    mosaic_epochs: list[float] = field(default_factory=list)  # [start, stop); DEIM-S: [4, 64], its policy's first two
    mosaic_size: int = 320  # DEIM's Mosaic `output_size`: each image's shorter side on the canvas
    mosaic_rotation: float = 10.0  # degrees either way (`rotation_range`)
    mosaic_translate: float = 0.1  # share of the canvas either way, per axis (`translation_range`)
    mosaic_scale: list[float] = field(default_factory=lambda: [0.5, 1.5])  # the affine's scale range (`scaling_range`)
    # MixUp over the batch: each image blended with the previous one in the batch (the first with the last),
    # the targets of both kept, as DEIM's collate function does
    mixup_prob: float = 0.0  # share of batches mixed up (DEIM: 0.5, `mixup_prob`); 0: off
    mixup_epochs: list[float] = field(default_factory=list)  # [start, stop); DEIM-S: [4, 64] (`mixup_epochs`)
    mixup_ratio: list[float] = field(default_factory=lambda: [0.45, 0.55])  # each image's own share, drawn in it


@dataclass
class DetOptimConfig:
    lr: float = 1e-4
    backbone_lr: float = 1e-5
    weight_decay: float = 1e-4  # none on norms and biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 2000  # linear warm-up (flat_cosine: quadratic, as DEIM's)
    min_lr_ratio: float = 1.0  # LR after the cosine decay as a share of the peak; 1.0: flat, as RT-DETRv2
    # cosine: warm-up, then cosine to min_lr_ratio over the rest of the run (1.0: flat, RT-DETRv2's).
    # flat_cosine: DEIM's FlatCosineLRScheduler: warm-up, flat until `flat_epochs`, cosine down to
    # min_lr_ratio (DEIM's `lr_gamma`: 0.5) when the strong augmentations stop, flat for the no-aug epochs
    schedule: str = "cosine"
    flat_epochs: Optional[float] = None  # flat_cosine only; DEIM's `flat_epoch` (e.g. 64 of D-FINE-S's 132)
    clip_grad: Optional[float] = 0.1
    grad_accum: int = 1


@dataclass
class DetTrainConfig:
    epochs: float = 72.0
    steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where supported), no, bf16, fp16
    ema_decay: float = 0.9999
    ema_warmups: int = 2000  # RT-DETR's ramp: decay x (1 - exp(-updates / ema_warmups)); 0: none
    sync_bn: bool = True  # batch statistics over all processes when several train (on GPUs)
    no_aug_epochs: float = 1.0  # the last epochs train without the strong augmentations or multi-scale
    # the strong augmentations (photometric, zoom-out, IoU crop, mosaic) start at this epoch; multi-scale runs
    # from the start. RT-DETRv2: 0; DEIM: 4 (its policy's first epoch)
    aug_start_epoch: float = 0.0
    log_every: int = 50
    ckpt_every: int = 1000
    keep_ckpts: int = 2
    eval_every: int = 0  # steps between evaluations; 0: at the end only; -1: every epoch (its steps come from the data)
    # size the schedule by the training set (distill.detection.schedule); keys set on the command line win
    scale_schedule: bool = False
    max_bad_steps: int = 10  # stop after this many non-finite losses in a row
    trackers: list[str] = field(default_factory=lambda: ["tensorboard", "jsonl"])


@dataclass
class DetEvalConfig:
    num_top: int = 300  # detections kept per image (top scores over queries x classes, no NMS)
    use_ema: bool = True  # evaluate the EMA weights (the model RT-DETR reports)
    visualize: int = 4  # val images drawn with their predictions into predictions.png; 0: none
    score_threshold: float = 0.3  # for the picture only


@dataclass
class DetDistillConfig:
    """Feature distillation from a frozen teacher into the encoder, in training only (RT-DETRv4's idea;
    `distill.detection.feature_distill`). Off while `teacher` is null. The defaults are RT-DETRv4-S's."""

    teacher: Optional[str] = None  # timm name, e.g. vit_small_patch14_dinov2.lvd142m (RT-DETRv4: DINOv3 ViT-B/16)
    teacher_pretrained: bool = True  # hub weights: a foundation model's features are the point
    # local weights instead (a run checkpoint, state dict, safetensors file or exported folder); a classifier
    # head in it is not needed and not read
    teacher_checkpoint: Optional[str] = None
    # The side the teacher sees (resized from the batch); null: its own pretrained side. RT-DETRv4 gives its
    # /16 ViT half the detector's side, so that its patch grid is the stride-32 grid (320 for 640).
    teacher_img_size: Optional[int] = None
    teacher_features: int = -1  # index into its features_only layers (a ViT's blocks); -1: the last (RT-DETRv4)
    # Which encoder map learns the teacher's: "attention", the intra-scale attention's output on the coarsest
    # level before the cross-scale fusion (RT-DETRv4: AIFI's output, stride 32), or one of the encoder's
    # output strides (e.g. 16)
    encoder_level: str = ATTENTION_LEVEL
    loss: str = "cosine"  # cosine (RT-DETRv4: 1 - cosine similarity per location) | mse | smooth_l1
    weight: float = 5.0  # RT-DETRv4-S and M: 5 (L 15, X 20); the start of the adaptive schedule
    schedule: str = "adaptive"  # constant: `weight` throughout; adaptive: RT-DETRv4's, from the gradient share
    # adaptive: the encoder attention's target share of the gradient's L1 mass on attention and decoder, in
    # percent, and its band. RT-DETRv4 takes the share of the whole model's gradient (S: rho 11, delta 1;
    # M: 3.5, 0.25; L: 2, 0.1; X: 2, 0.25), which levels off as the weight grows; this one rises towards 100%,
    # and reads higher for the same training (the feature_distill module says why)
    grad_share: float = 11.0
    grad_share_tolerance: float = 1.0
    # adaptive: the weight in the last epochs without strong augmentation, and after an epoch in which the
    # attention got no gradient (RT-DETRv4's default_weight: S 20, M 15, L 15, X 20)
    final_weight: float = 20.0
    # The largest weight, for the adaptive schedule; null: 4 x `weight` (RT-DETRv4's recipes never exceed four
    # times their starting weight). RT-DETRv4 has no ceiling: where the band is out of reach its weight grows
    # tenfold an epoch until the term swamps the detection loss; here it stays at this, with a warning
    max_weight: Optional[float] = None


@dataclass
class DetConfig:
    recipe: str = ""
    output_dir: Optional[str] = None  # default: runs/<recipe> (runs/<recipe>-2, ... when that holds a run)
    resume: Optional[str] = None  # "auto": newest checkpoint in output_dir; or a checkpoint path
    overwrite: bool = False  # start afresh in an output_dir that holds an earlier run, deleting its files
    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    optim: DetOptimConfig = field(default_factory=DetOptimConfig)
    train: DetTrainConfig = field(default_factory=DetTrainConfig)
    eval: DetEvalConfig = field(default_factory=DetEvalConfig)
    distill: DetDistillConfig = field(default_factory=DetDistillConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


DET_CHOICES = {
    "model.fusion_block": ("csp_repvgg", "uib", "extradw", "cib", "rep_elan"),
    "model.downsample": ("conv", "scdown", "scdown_linear"),
    "model.encoder_attention": ("aifi", "psa"),
    "model.head": HEADS,
    "model.class_loss": CLASSIFICATION_LOSSES,
    "data.generate": (None, "det_demo"),
    "data.format": DATA_FORMATS,
    "optim.schedule": ("cosine", "flat_cosine"),
    "train.precision": ("auto", "no", "bf16", "fp16"),
    "distill.loss": PRETRAIN_CHOICES["loss.feature_loss"],  # distill/feature_losses.py
    "distill.schedule": SCHEDULES,
}


EPOCH_WINDOW = at_least(0)  # [start, stop) in epochs, or [] (the lengths are checked in check_epochs)

# Upper bounds are far beyond RT-DETR's settings (width 256, 300 queries, 6 decoder layers at most): a typo
# stops at load rather than in an allocation.
DET_RANGES = {
    "model.num_classes": at_least(1, MAX_CLASSES),
    "model.hidden_dim": at_least(1, 8192),
    "model.expansion": above(0, 16),
    "model.num_queries": at_least(1, 10_000),
    "model.num_decoder_layers": at_least(1, 64),
    "model.num_heads": at_least(1, 256),
    "model.num_points": at_least(1, 64),
    "model.dim_feedforward": at_least(1, 65_536),
    "model.num_denoising": at_least(0, 10_000),
    "model.label_noise_ratio": PROBABILITY,
    "model.box_noise_scale": at_least(0),
    "model.out_strides": Range(1, 64, min_length=1),
    "model.eval_spatial_size": Range(32, 8192, length=2),  # (height, width) of the exported graph
    "model.depth_mult": above(0, 16),
    "model.dropout": FRACTION,
    "model.num_points_per_level": Range(1, 64, min_length=1),
    "model.reg_max": at_least(4, 1024),
    "model.reg_scale": above(0, 1000),
    "data.img_size": SIDE,
    "data.multiscale": SIDE,
    "data.batch_size": BATCH,
    "data.global_batch_size": BATCH,
    "data.val_batch_size": BATCH,
    "data.num_workers": WORKERS,
    "data.mosaic_prob": PROBABILITY,
    "data.mosaic_epochs": EPOCH_WINDOW,
    "data.mosaic_size": SIDE,
    "data.mosaic_rotation": at_least(0, 180),
    "data.mosaic_translate": PROBABILITY,
    "data.mosaic_scale": Range(0.0, 16.0, lo_open=True, length=2),
    "data.mixup_prob": PROBABILITY,
    "data.mixup_epochs": EPOCH_WINDOW,
    "data.mixup_ratio": Range(0.0, 1.0, length=2),
    "optim.lr": above(0),
    "optim.backbone_lr": at_least(0),
    "optim.weight_decay": at_least(0),
    "optim.betas": Range(0.0, 1.0, hi_open=True, length=2),
    "optim.eps": above(0),
    "optim.warmup_steps": at_least(0),
    "optim.min_lr_ratio": PROBABILITY,
    "optim.flat_epochs": at_least(0),
    "optim.clip_grad": above(0),
    "optim.grad_accum": at_least(1, 2**20),
    "train.epochs": above(0),
    "train.steps": at_least(1),
    "train.seed": SEED,
    "train.ema_decay": PROBABILITY,
    "train.no_aug_epochs": at_least(0),
    "train.aug_start_epoch": at_least(0),
    "train.log_every": at_least(1),
    "train.ckpt_every": at_least(1),
    "train.keep_ckpts": at_least(1),
    "train.eval_every": at_least(-1),
    "train.max_bad_steps": at_least(1),
    "cluster.timeout_s": TIMEOUT,
    "eval.num_top": at_least(1, 100_000),
    "eval.visualize": at_least(0, 1000),
    "eval.score_threshold": PROBABILITY,
    "distill.teacher_img_size": SIDE,
    "distill.weight": above(0),
    "distill.grad_share": above(0, 100, hi_open=True),
    "distill.grad_share_tolerance": at_least(0, 100),
    "distill.final_weight": above(0),
    "distill.max_weight": above(0),
}


def load_det_config(argv: Sequence[str], recipe_dir: Path = RECIPE_DIR, trackers: bool = True) -> DictConfig:
    """`trackers=False` leaves out the check that the trackers are installed, which loads Accelerate and torch."""
    cfg = load_config(DetConfig, argv, recipe_dir, DET_CHOICES, DET_RANGES)
    if trackers:
        from distill.engine.logging import check_trackers

        check_trackers(cfg.train.trackers, "train.trackers")
    if cfg.model.hidden_dim % cfg.model.num_heads:
        raise ConfigError(f"model.hidden_dim={cfg.model.hidden_dim} must be a multiple of "
                          f"model.num_heads={cfg.model.num_heads}")
    try:
        check_head(cfg.model, prefix="model.")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    bad = [s for s in list(cfg.data.multiscale) + [cfg.data.img_size] if s <= 0 or s % 32]
    if bad:
        raise ConfigError(f"data.img_size / data.multiscale must be positive multiples of 32, got {bad}")
    check_augment_keys(cfg)
    check_distill_weights(cfg.distill)
    if not cfg.train.steps:  # a length in steps is known in epochs once the data is read (plan_steps checks)
        check_epochs(cfg, float(cfg.train.epochs), f"train.epochs={cfg.train.epochs:g}")
    return cfg


def check_distill_weights(d: DictConfig) -> None:
    """The weights the term takes (with a teacher) lie under its ceiling."""
    if not d.teacher:
        return
    ceiling = weight_ceiling(d)
    where = f"distill.max_weight={ceiling:g}" + ("" if d.max_weight is not None else
                                                 f" ({CEILING_FACTOR:g} x distill.weight)")
    weights = [("weight", d.weight)] + ([("final_weight", d.final_weight)] if d.schedule == "adaptive" else [])
    for key, value in weights:
        if value > ceiling:
            raise ConfigError(f"distill.{key}={value:g} is above {where}: raise distill.max_weight or lower it")


def epoch_window(values, key: str) -> Optional[tuple[float, float]]:
    """[start, stop) of an epoch-window key, or None for []."""
    values = [float(v) for v in values]
    if not values:
        return None
    if len(values) != 2 or values[0] >= values[1]:
        raise ConfigError(f"{key}={_epochs(values)} must be [start, stop) with start < stop, or [] (while the "
                          "strong augmentations are on)")
    return values[0], values[1]


def _epochs(values) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def check_augment_keys(cfg: DictConfig) -> None:
    """What needs no run length: the windows' form, ordered ranges, the schedule's own keys."""
    data, optim = cfg.data, cfg.optim
    epoch_window(data.mosaic_epochs, "data.mosaic_epochs")
    epoch_window(data.mixup_epochs, "data.mixup_epochs")
    for key in ("mosaic_scale", "mixup_ratio"):
        lo, hi = data[key]
        if lo > hi:
            raise ConfigError(f"data.{key}={_epochs(data[key])} must be [low, high] with low <= high")
    if optim.schedule == "flat_cosine" and optim.flat_epochs is None:
        raise ConfigError("optim.schedule=flat_cosine needs optim.flat_epochs, the epoch the cosine starts at "
                          "(DEIM-D-FINE-S: 64 of 132)")
    if optim.schedule != "flat_cosine" and optim.flat_epochs is not None:
        raise ConfigError(f"optim.flat_epochs is a flat_cosine setting: set optim.schedule=flat_cosine "
                          f"(got optim.schedule={optim.schedule})")


def check_epochs(cfg: DictConfig, epochs: float, length: str) -> None:
    """The epoch keys against the run's length in epochs (`length` says where it comes from). Strong
    augmentations run in [train.aug_start_epoch, epochs - train.no_aug_epochs); Mosaic is one of them, as in
    DEIM's policy, and nothing but flip and resize runs in the last epochs, so both windows end by then, and
    so does the cosine of flat_cosine."""
    data, train, optim = cfg.data, cfg.train, cfg.optim
    stop = max(0.0, epochs - float(train.no_aug_epochs))
    where = f"epoch {stop:g} ({length} - train.no_aug_epochs={train.no_aug_epochs:g})"
    start = float(train.aug_start_epoch)
    if start > 0 and start >= stop:
        raise ConfigError(f"train.aug_start_epoch={start:g} leaves no epoch of strong augmentation: they stop "
                          f"at {where}")
    for name, prob in (("mosaic", data.mosaic_prob), ("mixup", data.mixup_prob)):
        key = f"data.{name}_epochs"
        window = epoch_window(data[f"{name}_epochs"], key)
        if prob <= 0:
            continue
        if window is None:
            if start >= stop:
                raise ConfigError(f"data.{name}_prob={prob:g} has no epoch to act in: {key}=[] follows the strong "
                                  f"augmentations, which stop at {where}")
            continue
        if window[1] > stop + 1e-9:
            raise ConfigError(f"{key}={_epochs(window)} runs past the strong augmentations, which stop at {where}")
        if name == "mosaic" and window[0] < start - 1e-9:
            raise ConfigError(f"{key}={_epochs(window)} starts before the strong augmentations do "
                              f"(train.aug_start_epoch={start:g}); Mosaic is one of them")
    if optim.schedule == "flat_cosine" and float(optim.flat_epochs) > stop + 1e-9:
        raise ConfigError(f"optim.flat_epochs={float(optim.flat_epochs):g} is beyond the end of the cosine, "
                          f"which ends with the strong augmentations at {where}")


def check_mixup_batch(cfg: DictConfig, processes: int, window: tuple[int, int], from_step: int = 0) -> None:
    """Batch MixUp mixes the images of one process's micro-batch with each other (DEIM's collate function): with
    one image a process there is nothing to mix, and the run would train without MixUp while its recipe and
    banner say otherwise. `window`: MixUp's [start, stop) steps; a run resumed past them is let be."""
    data = cfg.data
    if data.mixup_prob <= 0 or data.batch_size > 1 or max(window[0], from_step) >= window[1]:
        return
    split = (f" (data.global_batch_size={data.global_batch_size} over {processes} processes x optim.grad_accum="
             f"{cfg.optim.grad_accum})" if data.global_batch_size else "")
    raise ConfigError(f"data.mixup_prob={data.mixup_prob:g} mixes the images of a process's batch, but data.batch_size"
                      f" is {data.batch_size} image a process{split}: raise the batch or set data.mixup_prob=0")
