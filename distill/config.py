"""Recipes: a typed schema, filled by `recipes/NAME.yaml`, overridden by `key=value` arguments.

One schema per entry point (pretraining here; detection has its own in `distill.detection.recipe`).
Every key and type is checked before any work starts; a mistake names the key, where it came from,
and the valid alternatives.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from distill.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def packaged_dir(name: str) -> Path:
    """`recipes/` and `data_mixes/`: inside the package once installed, beside it in a checkout."""
    inside = Path(__file__).resolve().parent / name
    return inside if inside.is_dir() else PROJECT_ROOT / name


RECIPE_DIR = packaged_dir("recipes")


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
    channels_last: Optional[bool] = None  # null: on where CUDA is (on CPUs it depends on model and torch)
    # torch.compile in place: DDP wraps the compiled module and checkpoint keys stay plain. It costs a minute
    # or two of compilation at the start (and again after a resume) for faster steps on a GPU.
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend ("eager" / "aot_eager" to debug)
    compile_mode: Optional[str] = None  # torch.compile's mode (default, "max-autotune", ...)


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
    channels_last: Optional[bool] = None  # null: on where CUDA is
    # The frozen teacher compiled for inference; with fixed shapes "reduce-overhead" (CUDA graphs) suits it
    compile: bool = False
    compile_mode: Optional[str] = None
    # With no checkpoint and no pretrained weights, train the teacher on labels for this many steps
    # first (the embedded demo); 0 refuses to distil from a random teacher.
    fit_steps: int = 0
    fit_lr: float = 0.002
    fit_mix: Optional[str] = None  # the labelled mix the teacher is fitted on (default: data.mix)
    # Feature distillation (loss.feature_weight > 0): the teacher's layers whose maps the student learns, as
    # indices into its features_only layers (a ViT's: its blocks), negative from the deepest. One index serves
    # every student stride; otherwise one per entry of feature.strides, in order.
    features: list[int] = field(default_factory=lambda: [-1])


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
    feature_weight: float = 0.0  # > 0: distil the teacher's feature maps too (kd_weight 0: feature maps alone)
    feature_loss: str = "cosine"  # cosine | smooth_l1 | mse, see distill/feature_losses.py


@dataclass
class FeatureConfig:
    """Feature distillation: which student maps learn the teacher's (see distill/feature_objective.py)."""

    strides: list[int] = field(default_factory=lambda: [8, 16, 32])  # the student's maps a detector consumes
    grid: Optional[int] = None  # side of the grid the losses compare on; default: each teacher map's own


@dataclass
class TrainConfig:
    epochs: float = 400.0
    steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    seed: int = 0
    precision: str = "auto"  # auto: as `accelerate launch` says (its --mixed_precision / accelerate config), else bf16 where supported
    ema_decay: float = 0.9998
    ema_warmup: bool = True  # average all weights so far until the decay's horizon is filled (engine/ema.py)
    log_every: int = 50
    ckpt_every: int = 1000
    keep_ckpts: int = 2
    eval_every: int = 0  # 0: evaluate at the end only
    max_bad_steps: int = 10  # stop after this many non-finite losses in a row
    trackers: list[str] = field(default_factory=lambda: ["tensorboard", "jsonl"])  # Accelerate's (wandb, mlflow, ...); metrics.jsonl is always written


@dataclass
class ClusterConfig:
    """A days-long run on a shared cluster (distill/engine/preemption.py)."""

    # On any of these, every process stops at the next step (or unit) boundary with a checkpoint and exits with
    # status 75, which the SLURM scripts requeue: SLURM's preemption and scancel (SIGTERM), its `--signal`
    # ahead of the time limit (SIGUSR1 in scripts/*.sbatch), a terminal's Ctrl-C (SIGINT)
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    # Seconds a collective may wait for the slowest process before the run stops with an error naming it.
    # Longer than torch's NCCL default (600) because a process may legitimately lag by an evaluation pass
    timeout_s: float = 1800.0


@dataclass
class PretrainConfig:
    recipe: str = ""
    output_dir: Optional[str] = None  # default: runs/<recipe> (runs/<recipe>-2, ... when that holds a run)
    resume: Optional[str] = None  # "auto": newest checkpoint in output_dir; or a checkpoint path
    overwrite: bool = False  # start afresh in an output_dir that holds an earlier run, deleting its files
    dry_run: Optional[int] = None  # N: print the run's plan as if on N processes and exit, reading no images
    # "labels": after the distilled run, train the same student on labels alone with the same steps, data, batch
    # and seed, in <run>/baseline/; its top-1 joins the summary as baseline_top1
    baseline: Optional[str] = None
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    feature: FeatureConfig = field(default_factory=FeatureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# --------------------------------------------------------------------------------------------------
# Allowed values, checked at load: choices, and ranges of numbers
# --------------------------------------------------------------------------------------------------

# Upper bounds on sizes: far beyond any real run, low enough that a typo stops at load instead of failing an
# allocation later on.
MAX_SIDE = 4096  # image sides
MAX_BATCH = 2**20  # images per batch
MAX_CLASSES = 10**6
MAX_WORKERS = 256  # loader workers per process
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Range:
    """The numbers a key allows (every element, for a list key), and a list key's length."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    length: Optional[int] = None
    min_length: int = 0

    def problem(self, value: Any) -> Optional[str]:
        """What is wrong with `value`, or None. None values (unset optional keys) are always fine."""
        if value is None:
            return None
        if isinstance(value, Mapping) or OmegaConf.is_dict(value):  # a mapping's values
            value = list(value.values())
        if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
            values = list(value)
            if self.length is not None and len(values) != self.length:
                return f"must hold {self.length} values, got {len(values)}"
            if len(values) < self.min_length:
                return f"must hold at least {self.min_length} value{'s' if self.min_length > 1 else ''}"
            return next((f"holds {v}, but each value {p}" for v in values if (p := self._number(v))), None)
        return self._number(value)

    def _number(self, value: Any) -> Optional[str]:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        low_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        high_ok = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return None if low_ok and high_ok else f"must be {self.describe()}"

    def describe(self) -> str:
        if self.hi is None:
            return f"{'above' if self.lo_open else 'at least'} {self.lo}"
        if self.lo is None:
            return f"{'below' if self.hi_open else 'at most'} {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


def at_least(lo: float, hi: Optional[float] = None) -> Range:
    return Range(lo, hi)


def above(lo: float, hi: Optional[float] = None, hi_open: bool = False) -> Range:
    return Range(lo, hi, lo_open=True, hi_open=hi_open)


TIMEOUT = above(0, 7 * 24 * 3600)  # seconds a collective may wait: a week at most, beyond any real wait
FRACTION = Range(0.0, 1.0, hi_open=True)  # [0, 1): dropout, label smoothing
PROBABILITY = Range(0.0, 1.0)  # [0, 1]
SIDE = at_least(1, MAX_SIDE)
BATCH = at_least(1, MAX_BATCH)
WORKERS = at_least(0, MAX_WORKERS)
SEED = at_least(0, MAX_SEED)
MEAN_STD = Range(0.0, 1e3, lo_open=True, length=3)  # per RGB channel; a zero std would divide by zero

# A baseline is the distilled run with these keys changed: what it leaves out is what distillation adds. Labels
# only: cross-entropy with the label smoothing of supervised recipes (timm's, and the teacher fit's, 0.1) on the
# (mixed) labels of the same views.
BASELINES = {
    "labels": {"loss.kd_weight": 0.0, "loss.ce_weight": 1.0, "loss.label_smoothing": 0.1, "loss.feature_weight": 0.0},
}

# torch.compile's modes ("lite" only in newer releases, so not offered)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PRETRAIN_CHOICES = {
    "student.compile_mode": COMPILE_MODES,
    "teacher.compile_mode": COMPILE_MODES,
    "baseline": (None, *BASELINES),
    "teacher.mode": ("online", "offline"),
    "data.generate": (None, "demo", "demo_rich"),  # distill.data.synthetic.GENERATE_KINDS
    "teacher.interpolation": (None, "bilinear", "bicubic"),
    "train.precision": ("auto", "no", "bf16", "fp16"),
    "loss.feature_loss": ("cosine", "smooth_l1", "mse"),
}
PRETRAIN_RANGES = {
    "student.num_classes": at_least(1, MAX_CLASSES),
    "student.drop_rate": FRACTION,
    "student.drop_path_rate": FRACTION,
    "teacher.img_size": SIDE,
    "teacher.mean": MEAN_STD,
    "teacher.std": MEAN_STD,
    "teacher.fit_steps": at_least(0),
    "teacher.fit_lr": above(0),
    "data.img_size": SIDE,
    "data.batch_size": BATCH,
    "data.global_batch_size": BATCH,
    "data.num_workers": WORKERS,
    "data.val_batch_size": BATCH,
    "data.val_crop_pct": above(0, 1),
    "data.samples_per_epoch": at_least(1),
    "optim.lr": above(0),
    "optim.weight_decay": at_least(0),
    "optim.betas": Range(0.0, 1.0, hi_open=True, length=2),
    "optim.eps": above(0),
    "optim.warmup_epochs": at_least(0),
    "optim.warmup_steps": at_least(0),
    "optim.min_lr": at_least(0),
    "optim.clip_grad": above(0),
    "optim.grad_accum": at_least(1, MAX_BATCH),
    "loss.temperature": above(0),
    "loss.kd_weight": at_least(0),
    "loss.ce_weight": at_least(0),
    "loss.label_smoothing": FRACTION,
    "loss.feature_weight": at_least(0),
    "feature.strides": Range(1, MAX_SIDE, min_length=1),
    "feature.grid": SIDE,
    "teacher.features": Range(-MAX_SIDE, MAX_SIDE, min_length=1),
    "train.epochs": above(0),
    "train.steps": at_least(1),
    "train.seed": SEED,
    "train.ema_decay": PROBABILITY,
    "train.log_every": at_least(1),
    "train.ckpt_every": at_least(1),
    "train.keep_ckpts": at_least(1),
    "train.eval_every": at_least(0),
    "train.max_bad_steps": at_least(1),
    "cluster.timeout_s": TIMEOUT,
}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def parse_overrides(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """Split `recipe=NAME k=v ...` into the recipe name and the dotted overrides."""
    recipe, overrides = None, []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form key=value (see --help)")
        key, value = arg.split("=", 1)
        if key == "recipe":
            recipe = value
        else:
            overrides.append(f"{key.lstrip('-')}={value}")
    return recipe, overrides


@dataclass(frozen=True)
class SchemaKey:
    key: str  # dotted
    type: str  # as annotated: int, Optional[str], list[float], ...
    default: Any
    owner: type  # the dataclass that declares it
    name: str  # its field name there


def schema_keys(schema: type, prefix: str = "") -> list[SchemaKey]:
    """Every leaf key of a schema, in declaration order."""
    keys = []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += schema_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(SchemaKey(prefix + f.name, str(f.type), default, schema, f.name))
    return keys


def _lists_from_commas(overrides: list[str], schema: type) -> list[str]:
    """`train.trackers=wandb` or `optim.betas=0.9,0.99` for a list key: read as `[wandb]` / `[0.9,0.99]`,
    as `accelerate launch --log_with a,b` takes them."""
    list_keys = {k.key for k in schema_keys(schema) if k.type.replace("Optional[", "").startswith("list[")}
    out = []
    for item in overrides:
        key, value = item.split("=", 1)
        bare = value.strip()
        if key in list_keys and not bare.startswith(("[", "${")) and bare not in ("null", "???"):
            item = f"{key}=[{value}]"
        out.append(item)
    return out


def recipe_path(name: str, recipe_dir: Path = RECIPE_DIR, schema: Optional[type] = None) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = recipe_dir / f"{name}.yaml"
    if not path.exists():
        known = recipe_names(recipe_dir, schema)
        raise ConfigError(f"no recipe {name!r} (looked for {path}); known recipes: {', '.join(known)}")
    return path


def recipe_names(recipe_dir: Path = RECIPE_DIR, schema: Optional[type] = None, values: bool = True) -> list[str]:
    """The recipes in `recipe_dir`; with `schema`, those that fit it (a recipe belongs to the entry point whose
    schema it fits). `values=False` looks at the recipes' own top-level keys only: ten times faster (`--help`),
    and a recipe whose values are wrong is still listed, to fail with its reason when used."""
    paths = sorted(recipe_dir.glob("*.yaml"))
    fits = recipe_fits if values else _keys_fit
    return [p.stem for p in paths if schema is None or fits(schema, p, recipe_dir)]


def _keys_fit(schema: type, path: Path, recipe_dir: Path = RECIPE_DIR) -> bool:
    """Whether the recipe file's own top-level keys are fields of `schema`."""
    try:
        own = OmegaConf.load(path)
    except Exception:  # YAML syntax errors
        return False
    return isinstance(own, DictConfig) and not set(own) - {"base"} - {f.name for f in dataclasses.fields(schema)}


def recipe_fits(schema: type, path: Path, recipe_dir: Path = RECIPE_DIR) -> bool:
    """Whether the recipe file's keys and values fit `schema` (overrides and ranges aside)."""
    if not _keys_fit(schema, path):
        return False  # a key of another schema: known without merging (the slow part)
    try:
        _merge(_defaults(schema), _read_recipe(Path(path), recipe_dir), str(path), schema)
    except ConfigError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _defaults(schema: type) -> DictConfig:
    """The schema as a config, built once (the slow part of checking a recipe: `--help` checks every recipe);
    merging into it copies it."""
    return OmegaConf.structured(schema)


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
    choices: Optional[Mapping[str, Sequence[Any]]] = None,
    ranges: Optional[Mapping[str, Range]] = None,
) -> DictConfig:
    """Build the resolved configuration for one run; raises ConfigError on any mistake."""
    recipe, overrides = parse_overrides(argv)
    if not recipe:
        known = recipe_names(recipe_dir, schema)
        raise ConfigError(f"no recipe given: pass recipe=NAME; known recipes: {', '.join(known)}")
    path = recipe_path(recipe, recipe_dir, schema)
    cfg = OmegaConf.structured(schema)
    cfg = _merge(cfg, _read_recipe(path, recipe_dir), str(path), schema)
    items = _lists_from_commas(overrides, schema)
    try:
        cli = OmegaConf.from_dotlist(items)
    except Exception:
        for item, given in zip(items, overrides):  # name the one that does not parse
            try:
                OmegaConf.from_dotlist([item])
            except Exception as e:
                raise ConfigError(f"cannot parse {given!r}: {str(e).splitlines()[0]}") from None
        raise ConfigError(f"cannot parse the command-line overrides {overrides}") from None
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
            raise ConfigError(f"{key}={value!r} is not one of {', '.join('null' if a is None else str(a) for a in allowed)}")
    for key, allowed in (ranges or {}).items():
        value = OmegaConf.select(cfg, key)
        problem = allowed.problem(value)
        if problem:
            raise ConfigError(f"{key}={_show(value)} {problem}")
    return cfg


def _show(value: Any) -> str:
    return str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def load_pretrain_config(argv: Sequence[str], recipe_dir: Path = RECIPE_DIR, trackers: bool = True) -> DictConfig:
    """`trackers=False` leaves out the check that the trackers are installed, which loads Accelerate and torch."""
    cfg = load_config(PretrainConfig, argv, recipe_dir, PRETRAIN_CHOICES, PRETRAIN_RANGES)
    if trackers:
        from distill.engine.logging import check_trackers

        check_trackers(cfg.train.trackers, "train.trackers")
    return cfg


def save_config(cfg: DictConfig, path: Path) -> None:
    from distill.engine.checkpoint import atomic_write_text

    atomic_write_text(Path(path), OmegaConf.to_yaml(cfg))
