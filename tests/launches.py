"""What the multi-process tests share: launching an entry point as several gloo processes (as torchrun or srun
starts them: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_* set for each), killing or signalling a launch as a scheduler
would, and counting the calls that would make the host wait for a GPU.

The processes are forked from a warm interpreter (tests/warm_start.py) that imported the package once: each runs
its script as `python script.py` would, without paying seconds of imports again. tests/test_pretrain.py and
tests/test_det_train.py keep one launch each through torchrun itself."""
from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
from device_syncs import CountSyncs

import distill
from distill.engine.checkpoint import list_checkpoints

WARM_MODULES = ("distill.pretrain", "distill.finetune_det", "distill.label_views", "distill.curate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WarmStarter:
    """The client of tests/warm_start.py: one server per test process, started at first use."""

    def __init__(self):
        self.server = None
        self.status_dir = tempfile.mkdtemp(prefix="warm-start-")

    def start(self, script: str, argv: list[str], env: dict, log: Path, err: Path | None = None,
              cwd: Path | None = None) -> "Started":
        if self.server is None or self.server.poll() is not None:
            server_env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
            # the package these tests imported, whatever the environment says
            package_root = str(Path(distill.__file__).resolve().parent.parent)
            server_env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                           "PYTHONPATH": os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
            self.server = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("warm_start.py")), self.status_dir, *WARM_MODULES],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=server_env, text=True)
            assert self.server.stdout.readline().strip() == "ready", "the warm interpreter did not start"
            atexit.register(self.server.stdin.close)
        request = {"script": str(script), "argv": [str(a) for a in argv], "env": env, "log": str(log),
                   "err": str(err) if err else None, "cwd": str(cwd) if cwd else None}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return Started(json.loads(self.server.stdout.readline())["pid"], self.status_dir)


WARM = WarmStarter()


def run(script: str, *argv: str, env: dict | None = None, cwd: Path | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess:
    """`python script argv...` (`script` "-m NAME": `python -m NAME argv...`) in one process, returned as
    subprocess.run(capture_output=True, text=True) returns it (env: the whole environment; default this one's with
    OMP_NUM_THREADS=1)."""
    env = env or {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        proc = WARM.start(script, list(argv), env, out, err, cwd)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            raise
        read = lambda p: p.read_text() if p.exists() else ""  # noqa: E731
        return subprocess.CompletedProcess([script, *argv], code, read(out), read(err))


class Started:
    """One process forked by the warm interpreter, with the part of subprocess.Popen's interface the tests use."""

    def __init__(self, pid: int, status_dir: str):
        self.pid, self.status = pid, Path(status_dir) / str(pid)
        self.returncode = None

    def poll(self):
        if self.returncode is None and self.status.exists():
            self.returncode = int(self.status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(f"process {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)


class Launch:
    """The processes of one launch. Like torchrun's agent, once one process fails it stops the others (SIGTERM,
    then SIGKILL after `grace` seconds); `wait` returns the first failure's status, or 0."""

    def __init__(self, procs: list[Started], grace: float = 30.0):
        self.procs, self.grace, self.failed_at = procs, grace, None

    def poll(self):
        codes = [p.poll() for p in self.procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed and None in codes:
            if self.failed_at is None:
                self.failed_at = time.time()
                for p in self.procs:
                    p.send_signal(signal.SIGTERM)
            elif time.time() > self.failed_at + self.grace:
                for p in self.procs:
                    p.send_signal(signal.SIGKILL)
            return None
        if None in codes:
            return None
        return failed[0] if failed else 0

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired("launch", timeout)
            time.sleep(0.05)
        return code

    def ranks(self) -> dict[int, psutil.Process]:
        return {rank: psutil.Process(p.pid) for rank, p in enumerate(self.procs)}


def ranks(script: str, processes: int, out: Path, *args: str) -> list[Started]:
    """`processes` gloo processes started one by one as srun starts them (RANK, LOCAL_RANK, WORLD_SIZE set for
    each, no launcher in between): each one's exit status is its own. Output goes to `<out>.log`, appended."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes)}
    return [WARM.start(script, [f"output_dir={out}", *args], env | {"RANK": str(r), "LOCAL_RANK": str(r)},
                       Path(f"{out}.log"))
            for r in range(processes)]


def torchrun(script: str, processes: int, out: Path, *args: str, grace: float = 30.0) -> Launch:
    """`processes` gloo processes of an entry point, without ACCELERATE_USE_CPU: on a machine without CUDA
    they must still form one run, stopped together as torchrun stops them (after `grace` seconds, killed).
    Output goes to `<out>.log`."""
    return Launch(ranks(script, processes, out, *args), grace)


def workers(launch: Launch) -> dict[int, psutil.Process]:
    """A launch's training processes by rank (their own children are loader workers)."""
    return launch.ranks()


def signal_tree(process: psutil.Process, signum: int) -> None:
    """`signum` to a training process and to its loader workers, as SLURM signals every process of a job step."""
    for p in [process] + process.children(recursive=True):
        try:
            p.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def wait_for_step(metrics: Path, step: int, procs: list, log: Path) -> None:
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


def finish(proc: Launch, out: Path) -> None:
    assert proc.wait(timeout=900) == 0, Path(f"{out}.log").read_text()[-4000:]


def kill_after(proc: Launch, out: Path, step: int) -> int:
    """SIGKILL the whole launch (every process and loader worker) once a checkpoint of `step` or later exists;
    returns the newest checkpoint's step."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = [int(p.stem.split("-")[1]) for p in list_checkpoints(out)]
        if done and max(done) >= step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before step {step}: " + Path(f"{out}.log").read_text()[-3000:]
    family = [q for p in workers(proc).values() for q in [p, *p.children(recursive=True)]]
    for p in family:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=60)
    proc.wait()
    assert not (out / "summary.json").exists()
    return max(int(p.stem.split("-")[1]) for p in list_checkpoints(out))


@contextmanager
def sync_calls(monkeypatch, module, step_function: str):
    """Inside each call of `module.<step_function>`, the (call, file, function) of every call that would make
    the host wait for a GPU (`device_syncs.CountSyncs`: on the CPU the step's device is read as a GPU): yields
    the list, one list per step."""
    calls = []
    step = getattr(module, step_function)

    def watched(*args, **kwargs):
        counter = CountSyncs()
        calls.append(counter.calls)
        with counter:
            return step(*args, **kwargs)

    monkeypatch.setattr(module, step_function, watched)
    yield calls
