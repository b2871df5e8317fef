"""The Accelerator of a run and its trackers: a JSONL file always, plus any of Accelerate's (tensorboard, wandb,
mlflow, ...) that the recipe names."""
from __future__ import annotations

import json
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, get_available_trackers
from accelerate.utils import ProjectConfiguration

from distill.errors import ConfigError

logger = logging.getLogger("distill")

PROJECT = "distill"  # the tracker project (wandb / mlflow / comet); runs in it are named after their folder
# trackers whose run-name argument Accelerate passes through
RUN_NAME_ARGUMENT = {"wandb": "name", "mlflow": "run_name", "trackio": "name"}


class JsonlTracker(GeneralTracker):
    """One JSON object a line: `{"step": N, "time": t, **metrics}`; appended, so a resumed run continues it."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.path = Path(logging_dir) / "metrics.jsonl"

    def start(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        pass  # the resolved recipe is saved beside it as config.yaml

    def log(self, values: dict, step: Optional[int] = None, **kwargs):
        record = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _plain(value):
    return value.item() if isinstance(value, torch.Tensor) else value


MAX_TERMS = 256  # loss terms a log step can average in its one all-reduce (D-FINE-S logs about 40)


def process_means(accelerator: Accelerator, values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The mean over processes of each scalar in `values`: one all-reduce and one host read for them all.

    The values go in sorted key order into a vector of one length whatever the keys, followed by a fingerprint
    of the key list and its square: processes whose terms differ still take part in the same all-reduce, and
    every one of them sees from the same sums that the fingerprints differ (their sum squared equals the
    process count times the sum of their squares only when all are equal), so all stop together."""
    keys = sorted(values)
    stamp = float(zlib.crc32("\n".join(keys).encode()) % (1 << 20))  # sums exact in float64 up to 8192 processes
    row = [values[k].detach().to(torch.float64).reshape(()) for k in keys[:MAX_TERMS]]
    row = torch.stack(row) if row else torch.zeros(0, dtype=torch.float64, device=accelerator.device)
    row = torch.cat([row, row.new_zeros(MAX_TERMS - len(row)), row.new_tensor([stamp, stamp * stamp])])
    n = accelerator.num_processes
    sums = (accelerator.reduce(row, reduction="sum") if n > 1 else row).tolist()
    stamps, squares = int(sums[MAX_TERMS]), int(sums[MAX_TERMS + 1])
    if stamps * stamps != n * squares:
        raise RuntimeError(f"the processes have different terms to log; this one has {len(keys)}: {', '.join(keys)}")
    if len(keys) > MAX_TERMS:
        raise ValueError(f"{len(keys)} terms to log, more than the {MAX_TERMS} one log step averages")
    return {k: v / n for k, v in zip(keys, sums)}


def logged_trend(path: Path, key: str) -> Optional[dict]:
    """The first and the last value of `key` in a run's metrics.jsonl with their steps, or None if it was never
    logged. A resumed run logs again the steps after its checkpoint: the latest record of a step counts."""
    by_step: dict[int, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get(key) is not None:
                by_step[record["step"]] = record[key]
    if not by_step:
        return None
    first, last = min(by_step), max(by_step)
    return {"first_step": first, "first": by_step[first], "last_step": last, "last": by_step[last]}


def known_trackers() -> list[str]:
    return sorted({"jsonl", *LOGGER_TYPE_TO_CLASS})


def check_trackers(names: Sequence[str], key: str = "train.trackers") -> None:
    """Every named tracker exists and is installed: a run that was asked for metrics somewhere gets them there,
    or does not start."""
    known = known_trackers()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{key}: unknown tracker {', '.join(map(repr, unknown))}; known trackers: {', '.join(known)}")
    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n != "jsonl" and n not in available]
    if missing:
        hints = [f"'distill[{n}]'" if n == "wandb" else n for n in missing]  # each tracker's package: its name
        raise ConfigError(f"{key} names {', '.join(missing)}, which is not installed: pip install {' '.join(hints)} "
                          f"(or leave it out of {key})")


def resolve_precision(precision: str) -> Optional[str]:
    """The `mixed_precision` to hand the Accelerator, or None to leave it to Accelerate.

    A recipe that names a precision gets it. `auto` follows `accelerate launch` (its `--mixed_precision` or
    `accelerate config`); launched any other way, bf16 on GPUs that have it, full precision elsewhere (CPU
    autocast is slow to no gain)."""
    if precision != "auto":
        return precision
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(
    precision: str, grad_accum: int, output_dir: str | Path, trackers: Sequence[str] = ("tensorboard",)
) -> Accelerator:
    """`trackers` are Accelerate's tracker names; `metrics.jsonl` in `output_dir` is always written."""
    from distill.engine.distributed import start_processes

    start_processes()  # one run of all launched processes (gloo without CUDA), or a clear stop
    log_with = [JsonlTracker("run", str(output_dir))] + [t for t in dict.fromkeys(trackers) if t != "jsonl"]
    mixed_precision = resolve_precision(precision)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
    accelerator = Accelerator(
        **({"mixed_precision": mixed_precision} if mixed_precision else {}),
        gradient_accumulation_steps=grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir)),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    return accelerator


def finish_trackers(accelerator: Accelerator) -> None:
    """Close a run's trackers. (`Accelerator.end_training` would also end the process group, which a run that
    follows in the same launch still needs.)"""
    for tracker in accelerator.trackers:
        tracker.finish()


def run_name(cfg) -> str:
    """A run is named after its folder (`runs/<recipe>` unless `output_dir` says otherwise)."""
    return Path(cfg.output_dir).name


def start_trackers(accelerator: Accelerator, cfg, project: str = PROJECT) -> None:
    """Start the trackers with the resolved configuration (flattened to dotted keys of plain values, as
    tensorboard's hparams and the hosted trackers take them) and the run's name."""
    from omegaconf import OmegaConf

    name = run_name(cfg)
    init_kwargs = {tracker: {argument: name} for tracker, argument in RUN_NAME_ARGUMENT.items()}
    accelerator.init_trackers(project, config=flat_config(OmegaConf.to_container(cfg, resolve=True)),
                              init_kwargs=init_kwargs)


def flat_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}, "c": [1, 2]}` -> `{"a.b": 1, "c": "[1, 2]"}`: scalars stay, lists become text."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= flat_config(value, f"{prefix}{key}.")
        elif isinstance(value, (list, tuple)):
            flat[f"{prefix}{key}"] = json.dumps(value)
        else:
            flat[f"{prefix}{key}"] = value
    return flat
