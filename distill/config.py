"""Recipes: a typed schema, filled by `recipes/NAME.yaml`, overridden by `key=value` arguments.

One schema per entry point (pretraining here; detection has its own in `distill.detection.recipe`).
Every key and type is checked before any work starts; a mistake names the key, where it came from,
and the valid alternatives.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RECIPE_DIR = PROJECT_ROOT / "recipes"


class ConfigError(ValueError):
    """A recipe or a command-line override that does not fit the schema."""


# --------------------------------------------------------------------------------------------------
# The pretraining schema
# --------------------------------------------------------------------------------------------------


@dataclass
class StudentConfig:
    name: str = "mobilenetv4_conv_small"  # timm name, or `torchvision/<name>` (see distill.models)
    pretrained: bool = False  # timm's supervised weights (hub access needed)
    checkpoint: Optional[str] = None  # a state dict / run checkpoint to start from
    num_classes: int = 1000
    drop_rate: float = 0.0  # dropout before the classifier only, as in the paper
    drop_path_rate: float = 0.0
    channels_last: bool = False
    compile: bool = False


@dataclass
class TeacherConfig:
    mode: str = "online"  # online: teacher in the loop; offline: stored soft labels in the shards
    name: str = "tf_efficientnet_l2.ns_jft_in1k"  # timm name or `torchvision/<name>`
    pretrained: bool = True
    checkpoint: Optional[str] = None  # a local checkpoint file instead of hub weights
    img_size: Optional[int] = None  # default: the teacher's own pretrained input size
    interpolation: Optional[str] = None  # resizing the view to img_size; default: the teacher's own (timm config)
    mean: Optional[list[float]] = None  # default: the teacher's own normalisation
    std: Optional[list[float]] = None
    channels_last: bool = False
    compile: bool = False
    # With no checkpoint and no pretrained weights, train the teacher on labels for this many steps
    # first (the embedded demo); 0 refuses to distil from a random teacher.
    fit_steps: int = 0
    fit_lr: float = 0.002


@dataclass
class DataConfig:
    mix: str = "mnv4"  # data_mixes/NAME.yaml, or a path to a mix file
    root: str = "data"  # relative shard paths in the mix resolve against this folder
    generate: Optional[str] = None  # "demo": generate the demo dataset under `root` if missing
    img_size: int = 224
    batch_size: int = 128  # per process
    global_batch_size: Optional[int] = None  # when set, batch_size = global / (processes x grad_accum)
    num_workers: int = 4
    val_shards: Optional[str] = None  # relative to `root`; brace patterns allowed
    val_batch_size: int = 256
    val_crop_pct: float = 0.875
    # Images in one epoch (1,281,167 for ImageNet-1k). Default: the images of the mix's first source, from its
    # manifest (stored views count once per image, not once per replica).
    samples_per_epoch: Optional[int] = None
    record_keys: bool = False  # audit: each process writes the (source, key) of every sample it trains on


@dataclass
class OptimConfig:
    lr: float = 0.002  # peak LR for the whole (global) batch as given; no implicit scaling
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_epochs: float = 5.0
    warmup_steps: Optional[int] = None  # overrides warmup_epochs when set
    min_lr: float = 0.0
    clip_grad: Optional[float] = None
    grad_accum: int = 1


@dataclass
class LossConfig:
    temperature: float = 1.0  # the paper's setting
    kd_weight: float = 1.0
    ce_weight: float = 0.0  # optional cross-entropy on hard labels
    label_smoothing: float = 0.0


@dataclass
class TrainConfig:
    epochs: float = 400.0
    steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where supported), no, bf16, fp16
    ema_decay: float = 0.9998
    ema_warmup: bool = True  # average all weights so far until the decay's horizon is filled (engine/ema.py)
    log_every: int = 50
    ckpt_every: int = 1000
    keep_ckpts: int = 2
    eval_every: int = 0  # 0: evaluate at the end only
    max_bad_steps: int = 10  # stop after this many non-finite losses in a row
    trackers: list[str] = field(default_factory=lambda: ["tensorboard", "jsonl"])


@dataclass
class PretrainConfig:
    recipe: str = ""
    output_dir: Optional[str] = None  # default: runs/<recipe>
    resume: Optional[str] = None  # "auto": newest checkpoint in output_dir; or a checkpoint path
    dry_run: Optional[int] = None  # N: print the run's plan as if on N processes and exit, reading no images
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


PRETRAIN_CHOICES = {
    "teacher.mode": ("online", "offline"),
    "teacher.interpolation": (None, "bilinear", "bicubic"),
    "train.precision": ("auto", "no", "bf16", "fp16"),
}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def parse_overrides(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """Split `recipe=NAME k=v ...` into the recipe name and the dotted overrides."""
    recipe, overrides = None, []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form key=value")
        key, value = arg.split("=", 1)
        if key == "recipe":
            recipe = value
        else:
            overrides.append(f"{key.lstrip('-')}={value}")
    return recipe, overrides


def recipe_path(name: str, recipe_dir: Path = RECIPE_DIR) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = recipe_dir / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in recipe_dir.glob("*.yaml"))
        raise ConfigError(f"no recipe {name!r} (looked for {path}); known recipes: {', '.join(known)}")
    return path


def _read_recipe(path: Path, recipe_dir: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A recipe may name `base: OTHER` to start from another recipe (one level or more)."""
    if path in seen:
        raise ConfigError(f"recipe {path} inherits from itself through {[str(p) for p in seen]}")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = _read_recipe(recipe_path(str(base), recipe_dir), recipe_dir, seen + (path,))
    return OmegaConf.merge(parent, raw)


def _valid_keys(schema: Any, dotted: str) -> list[str]:
    """The keys the schema allows next to `dotted` (the parent node's fields)."""
    node = schema
    for part in dotted.split(".")[:-1]:
        if not dataclasses.is_dataclass(node):
            break
        node = {f.name: f for f in dataclasses.fields(node)}[part].default_factory()  # type: ignore[misc]
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _merge(cfg: DictConfig, update: DictConfig, source: str, schema: Any) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, update)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        valid = _valid_keys(schema, key)
        raise ConfigError(
            f"unknown key {key!r} in {source}; valid keys here: {', '.join(valid)}"
        ) from None
    except (OmegaConfBaseException, TypeError) as e:
        key = getattr(e, "full_key", None) or _first_key(update)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad value for {key!r} in {source}: {msg}") from None


def _first_key(update: DictConfig) -> str:
    """The dotted key an update sets (for errors that carry none): its first leaf."""
    node, parts = update, []
    while isinstance(node, DictConfig) and len(node):
        key = next(iter(node.keys()))
        parts.append(str(key))
        node = node._get_node(key)
    return ".".join(parts) or "?"


def load_config(
    schema: type,
    argv: Sequence[str],
    recipe_dir: Path = RECIPE_DIR,
    choices: Optional[dict[str, Sequence[str]]] = None,
) -> DictConfig:
    """Build the resolved configuration for one run; raises ConfigError on any mistake."""
    recipe, overrides = parse_overrides(argv)
    if not recipe:
        known = sorted(p.stem for p in recipe_dir.glob("*.yaml"))
        raise ConfigError(f"no recipe given: pass recipe=NAME; known recipes: {', '.join(known)}")
    path = recipe_path(recipe, recipe_dir)
    cfg = OmegaConf.structured(schema)
    cfg = _merge(cfg, _read_recipe(path, recipe_dir), str(path), schema)
    try:
        cli = OmegaConf.from_dotlist(overrides)
    except Exception as e:
        raise ConfigError(f"cannot parse command-line overrides {overrides}: {e}") from None
    cfg = _merge(cfg, cli, "command line", schema)
    try:
        OmegaConf.resolve(cfg)  # interpolations fail here, before any work, not when a value is first read
        OmegaConf.merge(OmegaConf.structured(schema), cfg)  # resolved values are type-checked again
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"bad value for {key!r}: {str(e).splitlines()[0]}") from None
    cfg.recipe = path.stem if path.parent == recipe_dir else str(path)
    for key, allowed in (choices or {}).items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")
    return cfg


def load_pretrain_config(argv: Sequence[str], recipe_dir: Path = RECIPE_DIR) -> DictConfig:
    cfg = load_config(PretrainConfig, argv, recipe_dir, PRETRAIN_CHOICES)
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / Path(cfg.recipe).stem)
    return cfg


def save_config(cfg: DictConfig, path: Path) -> None:
    from distill.engine.checkpoint import atomic_write_text

    atomic_write_text(Path(path), OmegaConf.to_yaml(cfg))


def exit_on_user_error(fn):
    """Decorator for entry points: a mistake in the recipe, a missing file, a checkpoint that does not fit or
    a run stopped by non-finite losses prints one clear message (exit status 2), not a deep traceback."""
    from distill.engine.checkpoint import CheckpointMismatch
    from distill.losses import NonFiniteLoss

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, CheckpointMismatch, FileNotFoundError, NonFiniteLoss) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
