"""The Accelerator of a run and its trackers: tensorboard (Accelerate's own) and a JSONL file."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration

logger = logging.getLogger("distill")


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


def resolve_precision(precision: str) -> str:
    """`auto`: bf16 on GPUs that have it, full precision elsewhere (CPU autocast is slow to no gain)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(
    precision: str, grad_accum: int, output_dir: str | Path, trackers: Sequence[str] = ("tensorboard", "jsonl")
) -> Accelerator:
    from distill.engine.distributed import start_processes

    start_processes()  # one run of all launched processes (gloo without CUDA), or a clear stop
    log_with = [JsonlTracker("run", str(output_dir)) if t == "jsonl" else t for t in trackers]
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
    accelerator = Accelerator(
        mixed_precision=resolve_precision(precision),
        gradient_accumulation_steps=grad_accum,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir)),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    return accelerator
