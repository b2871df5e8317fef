"""What the multi-process tests share: launching an entry point as several gloo processes, killing a whole launch
as a scheduler would, and counting the calls that would make the host wait for a GPU."""
from __future__ import annotations

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
