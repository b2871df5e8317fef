"""What a run shows while it works: a start-up banner, and the progress of its loops.

On a terminal progress is a tqdm bar; anywhere else (a SLURM log, a pipe, a file) it is one plain log line per
`log()` call, so a log file reads as a table instead of thousands of carriage returns. Both show images/s.
Only the main process shows anything.
"""
from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import IO, Mapping, Optional

from torch import nn
from tqdm.auto import tqdm

from distill.engine.threads import describe_threads

logger = logging.getLogger("distill")


class ProgressBar:
    """`update(step, images)` after each step (`step` counts from the start of the run, so a resumed run
    starts where it stopped); `log(**values)` at each log interval; `close()` at the end."""

    def __init__(self, total: Optional[int], desc: str, initial: int = 0, unit: str = "step", enabled: bool = True,
                 stream: Optional[IO] = None, interactive: Optional[bool] = None):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = _is_terminal(self.stream) if interactive is None else interactive
        self.step = self._logged_step = initial
        self._images = 0  # since the last log()
        self._since = time.perf_counter()
        self._start = (self._since, initial)
        self._bar = None
        if enabled and self.interactive:
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, step: int, images: int = 0) -> None:
        """Now at `step`; `images` were processed since the previous update."""
        if self._bar is not None:
            self._bar.update(step - self.step)
        self.step = step
        self._images += images

    def log(self, **values: float) -> None:
        """Show `values` (loss, lr, ...) with the images/s since the previous log()."""
        now = time.perf_counter()
        rate = self._images / max(now - self._since, 1e-9)
        shown = {k: _short(v) for k, v in values.items()}
        if self._images:
            shown["img/s"] = f"{rate:.0f}"
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
        elif self.enabled:
            logger.info(self._line(shown, now))
        self._images, self._since, self._logged_step = 0, now, self.step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.step != self._logged_step:
            self.log()

    def _line(self, shown: Mapping[str, str], now: float) -> str:
        parts = [f"{self.desc} {self.step}" + (f"/{self.total} ({100 * self.step / self.total:.0f}%)" if self.total else "")]
        start_time, start_step = self._start
        if self.total and start_step < self.step < self.total:
            left = (self.total - self.step) * (now - start_time) / (self.step - start_step)
            parts.append(f"eta {datetime.timedelta(seconds=round(left))}")
        parts += [f"{k} {v}" for k, v in shown.items()]
        return " | ".join(parts)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def parameters(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"


def describe_mix(mix) -> str:
    """`name: a 0.50 -> 0.20, b (mixup) 0.50 -> 0.80`: each source's weight at the start and at the end."""
    start, end = mix.weights_at(0.0), mix.weights_at(1.0)
    sources = []
    for name, mixup, w0, w1 in zip(mix.source_names, mix.mixup_flags, start, end):
        weight = f"{w0:.2f}" if abs(w0 - w1) < 1e-9 else f"{w0:.2f} -> {w1:.2f}"
        sources.append(f"{name}{' (mixup)' if mixup else ''} {weight}")
    return f"{getattr(mix.path, 'stem', mix.path)}: {', '.join(sources)}"


def banner(accelerator, recipe: str, output_dir, *, batch_size: int, grad_accum: int = 1,
           steps: Optional[int] = None, steps_per_epoch: Optional[float] = None,
           models: Optional[Mapping[str, nn.Module]] = None, details: Optional[Mapping[str, str]] = None) -> str:
    """What is about to run, logged once by the main process before the loop; returned as text too.

    `models` maps a label (`student mobilenetv4_conv_small`) to the model (anything else than a module, or
    None, is left out); `details` adds labelled lines (data mix, teacher, ...)."""
    processes = accelerator.num_processes
    global_batch = processes * batch_size * grad_accum
    lines = [
        f"recipe {recipe} -> {output_dir}",
        f"{processes} process{'es' if processes > 1 else ''} x batch {batch_size} x accumulation {grad_accum} = "
        f"{global_batch} images a step; precision {accelerator.mixed_precision}; device {accelerator.device}",
    ]
    lines.append(f"torch threads {describe_threads()}")
    if steps is not None:
        epochs = f" = {steps / steps_per_epoch:.2f} epochs of {steps_per_epoch:.1f} steps" if steps_per_epoch else ""
        lines.append(f"{steps} steps{epochs}")
    lines += [f"{label}: {parameters(model)}" for label, model in (models or {}).items() if isinstance(model, nn.Module)]
    lines += [f"{label}: {text}" for label, text in (details or {}).items()]
    text = "\n".join(lines)
    if accelerator.is_main_process:
        logger.info("starting\n  %s", "\n  ".join(lines))
    return text
