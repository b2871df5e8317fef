"""Stopping early on a scheduler's signal, and collectives that fail with a message instead of hanging.

SLURM sends SIGTERM when it preempts or cancels a job and, with `--signal=USR1@300`, SIGUSR1 five minutes before
the time limit; a terminal sends SIGINT. On any of the recipe's stop signals every process finishes the step it is
in, the processes agree to stop at the same step boundary (the signal may reach only some of them), the run is
checkpointed there and every process exits with `EXIT_REQUEUE`, which the SLURM scripts turn into
`scontrol requeue`; `resume=auto` continues from that checkpoint. Further signals while stopping are counted and
otherwise ignored, so a second Ctrl-C or the launcher's forwarded SIGTERM cannot cut the checkpoint short.

The agreement is one all-reduce (MAX of "a signal arrived here") per step on a gloo group of its own, started at
one boundary and read at the next: the host never waits for the device or for slower processes' latest step, and
a stop seen on one process stops all of them one step later. Before each step's collectives a process also
leaves the step's number in the launch's key-value store, so a collective that times out names the processes
that never arrived.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from distill.errors import EXIT_REQUEUE, CollectiveTimeout, ConfigError, Preempted  # noqa: F401 (their old home)

logger = logging.getLogger("distill")

STOP_KEY = "distill/stop"
HEARTBEAT_KEY = "distill/step/{rank}"
WRITTEN_KEY = "distill/stop-checkpoint-written"


# --------------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------------


class StopSignals:
    """Records stop signals instead of dying on them. Only the first is acted on; the rest are counted."""

    def __init__(self):
        self.received: Optional[str] = None
        self.count = 0
        self._previous: dict[int, object] = {}

    def install(self, names: Sequence[str]) -> "StopSignals":
        signums = [parse_signal(name) for name in names]
        self.received, self.count = None, 0
        if threading_main():
            for signum in signums:
                if signum not in self._previous:
                    self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            message = f"{name} received: stopping at the next step (or unit) boundary with a checkpoint\n"
        else:
            message = f"{name} received again ({self.count} signals): still stopping, the checkpoint is not cut short\n"
        os.write(sys.stderr.fileno(), message.encode())  # no logging inside a signal handler (its locks)

    def uninstall(self) -> None:
        """The handlers as they were (an entry point called from Python leaves its caller's signals alone)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def parse_signal(name: str) -> int:
    try:
        return int(signal.Signals[name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"])
    except KeyError:
        valid = ", ".join(s.name for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP))
        raise ConfigError(f"cluster.stop_signals: unknown signal {name!r}; use names such as {valid}") from None


STOP = StopSignals()  # one per process: signal handlers are process-wide


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A loader's `worker_init_fn`: SLURM and a terminal signal every process of a job, and a worker that died on
    the signal would take its loader with it before the main process could checkpoint."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def end_loader_workers() -> None:
    """Ends the loader workers an entry point leaves behind. They ignore the stop signals (above), so the SIGTERM
    that multiprocessing sends its daemonic children when the interpreter exits does not end them, and its join
    would then wait for ever where a run ended while an iterator still held them (an error, a stop)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon and getattr(getattr(child, "_target", None), "__name__", "") == "_worker_loop":
            child.kill()
            child.join(5)


# --------------------------------------------------------------------------------------------------
# Agreement and heartbeats
# --------------------------------------------------------------------------------------------------


_GROUPS: dict[int, object] = {}  # id of the training group -> its gloo side group


def side_group(timeout_s: float):
    """A gloo group beside the training one (NCCL on GPUs), for host-side flags; one per process group."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return _GROUPS[key]


def launch_store():
    """The launch's key-value store (torchrun's or the rendezvous TCP store), or None for a single process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


class StopAgreement:
    """`agreed(step)` is True on every process at the same step boundary once any process received a stop
    signal: the all-reduce started at one boundary is read at the next (by then long complete). `ready(step)`
    says this process has its data for `step` and goes into its collectives."""

    def __init__(self, timeout_s: float, signals: StopSignals = STOP):
        self.signals, self.timeout_s = signals, timeout_s
        self.group = side_group(timeout_s)
        self.store = launch_store()
        self.rank = dist.get_rank() if self.group is not None else 0
        self._pending = None

    def ready(self, step: int) -> None:
        if self.store is not None:
            self.store.set(HEARTBEAT_KEY.format(rank=self.rank), str(step))

    def agreed(self, step: int) -> bool:
        if self.group is None:
            return self.signals.received is not None
        decided = self._collect(step)
        flag = torch.tensor([int(self.signals.received is not None)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return decided

    def finish(self, step: int) -> bool:
        """The last answer, at the end of a loop (every process calls it once; no round is left running)."""
        if self.group is None:
            return self.signals.received is not None
        decided = self._collect(step)
        flag = torch.tensor([int(self.signals.received is not None)], dtype=torch.int32)
        with timeouts_named(step, self.timeout_s):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return decided or bool(flag.item())

    def _collect(self, step: int) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        with timeouts_named(step, self.timeout_s):
            work.wait()
        return bool(flag.item())


def stop_agreed(timeout_s: float) -> bool:
    """One agreement outside a loop (between the runs of a launch): True on every process or on none."""
    return StopAgreement(timeout_s).finish(step=-1)


class UnitStop:
    """For passes whose processes do different numbers of units (labelling, scoring): a process that received a
    signal publishes it in the launch's store (a new one for each launch), and every process stops after the unit
    it is on. The pass then calls `stop_agreed`, which every process reaches."""

    def __init__(self, signals: StopSignals = STOP):
        self.signals, self.store, self._published = signals, launch_store(), False

    def requested(self) -> bool:
        if self.signals.received is not None:
            if self.store is not None and not self._published:
                self.store.set(STOP_KEY, self.signals.received)
                self._published = True
            return True
        return self.store is not None and self.store.check([STOP_KEY])


def stop_here(accelerator, writer, where: str):
    """Every process, at the agreed stop once its checkpoint is handed to `writer`: the main process waits for the
    file, the others for its word in the store (no collective, whose timeout the write could outlast); then all
    go. None may go first: srun ends a job step's other processes when one exits with a non-zero status."""
    store = launch_store()
    if accelerator.is_main_process:
        writer.wait()
        if store is not None:
            store.set(WRITTEN_KEY, where)
    elif store is not None:
        store.wait([WRITTEN_KEY])
    raise Preempted(where)


def behind(step: int) -> str:
    """Which processes reached which step, from their heartbeats in the launch's store."""
    store = launch_store()
    if store is None:
        return ""
    try:
        store.set_timeout(timedelta(seconds=5))
        world = dist.get_world_size()
        steps = {}
        for rank in range(world):
            key = HEARTBEAT_KEY.format(rank=rank)
            steps[rank] = int(store.get(key)) if store.check([key]) else None
    except Exception as e:  # the store's host is gone too
        return f" (the launch's store did not answer: {type(e).__name__})"
    known = [s for s in steps.values() if s is not None]
    top = max(known) if known else step
    late = {r: s for r, s in steps.items() if s is None or s < top}
    if not late:
        return f"; every process had reached step {top}"
    named = ", ".join(f"process {r} ({'no step yet' if s is None else f'last ready for step {s}'})"
                      for r, s in sorted(late.items()))
    return f"; never arrived at step {top}: {named}"


class timeouts_named:
    """Turns a failed collective (a timeout, or a peer that closed its connection) into a CollectiveTimeout that
    names the step, the timeout and the processes that fell behind."""

    MARKERS = ("timed out", "timeout", "connection closed by peer", "connection reset by peer", "broken pipe")

    def __init__(self, step: int | Callable[[], int], timeout_s: float, where: str = "a collective"):
        self._step, self.timeout_s, self.where = step, timeout_s, where

    @property
    def step(self) -> int:
        return self._step() if callable(self._step) else self._step

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or not isinstance(error, RuntimeError) or isinstance(error, CollectiveTimeout):
            return False
        if not any(m in str(error).lower() for m in self.MARKERS):
            return False
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise CollectiveTimeout(
            f"process {rank}, step {self.step}: {self.where} with the other processes failed "
            f"(cluster.timeout_s={self.timeout_s:g}){behind(self.step)}. "
            f"First line of the error: {str(error).strip().splitlines()[0][:200]}"
        ) from error
