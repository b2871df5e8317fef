"""What the multi-process tests share: launching an entry point as several gloo processes (under torchrun, or one
process per rank as srun starts them), killing or signalling a launch as a scheduler would, and counting the
calls that would make the host wait for a GPU."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

from distill.engine.checkpoint import list_checkpoints

# Tensor methods that wait for the device when the tensor lives on a GPU
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__", "__index__")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, processes: int, out: Path, *args: str) -> subprocess.Popen:
    """`processes` gloo processes of an entry point, without ACCELERATE_USE_CPU: on a machine without CUDA
    they must still form one run. Output goes to `<out>.log`, appended."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_port", str(free_port()), script, f"output_dir={out}", *args]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=open(f"{out}.log", "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def ranks(script: str, processes: int, out: Path, *args: str) -> list[subprocess.Popen]:
    """`processes` gloo processes started one by one as srun starts them (RANK, LOCAL_RANK, WORLD_SIZE set for
    each, no launcher in between): each one's exit status is its own. Output goes to `<out>.log`, appended."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(processes)}
    return [subprocess.Popen([sys.executable, script, f"output_dir={out}", *args],
                             env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}, stdout=open(f"{out}.log", "a"),
                             stderr=subprocess.STDOUT, start_new_session=True)
            for r in range(processes)]


def workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """torchrun's training processes by rank (its direct children; their own children are loader workers)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        found = {}
        for child in psutil.Process(proc.pid).children():
            try:
                found[int(child.environ()["RANK"])] = child
            except (KeyError, psutil.Error):
                continue
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError("torchrun started no training process")


def signal_tree(process: psutil.Process, signum: int) -> None:
    """`signum` to a training process and to its loader workers, as SLURM signals every process of a job step."""
    for p in [process] + process.children(recursive=True):
        try:
            p.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def wait_for_step(metrics: Path, step: int, procs: list[subprocess.Popen], log: Path) -> None:
    """Until `metrics` (metrics.jsonl, logged every step) shows `step`; fails if the launch ends first."""
    deadline = time.time() + 600
    while time.time() < deadline:
        if metrics.exists():
            steps = [json.loads(line).get("step") or 0 for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        assert all(p.poll() is None for p in procs), f"the launch ended before step {step}: " + log.read_text()[-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {metrics} after 10 minutes")


def stopped_at(log: Path) -> int:
    """The step at which the launch's processes stopped on a signal (each logs it; all must agree)."""
    found = {int(line.split("at step ")[1].split()[0]) for line in log.read_text().splitlines()
             if line.startswith("stopped on a signal at step")}
    assert len(found) == 1, f"stops logged: {found}\n" + log.read_text()[-3000:]
    return found.pop()


def finish(proc: subprocess.Popen, out: Path) -> None:
    assert proc.wait(timeout=900) == 0, Path(f"{out}.log").read_text()[-4000:]


def kill_after(proc: subprocess.Popen, out: Path, step: int) -> int:
    """SIGKILL the whole launch (torchrun starts its workers in sessions of their own, so every descendant)
    once a checkpoint of `step` or later exists; returns the newest checkpoint's step."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = [int(p.stem.split("-")[1]) for p in list_checkpoints(out)]
        if done and max(done) >= step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before step {step}: " + Path(f"{out}.log").read_text()[-3000:]
    family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in family:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=60)
    proc.wait()
    assert not (out / "summary.json").exists()
    return max(int(p.stem.split("-")[1]) for p in list_checkpoints(out))


@contextmanager
def sync_calls(monkeypatch, module, step_function: str):
    """Inside each call of `module.<step_function>`, the (method, file, function) of every SYNC_METHODS call:
    yields the list, one list per step."""
    calls, inside = [], [False]
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, __original=original, __name=name, **k):
            if inside[0]:
                frame = sys._getframe(1)
                calls[-1].append((__name, Path(frame.f_code.co_filename).name, frame.f_code.co_name))
            return __original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    step = getattr(module, step_function)

    def watched(*args, **kwargs):
        calls.append([])
        inside[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(module, step_function, watched)
    yield calls
