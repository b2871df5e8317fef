"""A warm interpreter that starts entry points for the multi-process tests: it imports the package once, then forks
one child per request, and each child runs the requested script as `python script.py args` would (as `__main__`,
its own session, environment, arguments and log; normal interpreter exit). A launch of several processes then
pays the imports of torch, timm and the package once instead of once per process (seconds of CPU each).

    python tests/warm_start.py STATUS_DIR MODULE...

Requests arrive on stdin, one JSON line each: {"script", "argv", "env", "log", "err", "cwd"} (err: where stderr
goes, if not to the log; a script "-m NAME" runs module NAME as `python -m NAME`); the child's pid is answered on
stdout. A finished child's exit status (negative: the signal that ended it) is written to STATUS_DIR/<pid>. The
server ends when stdin closes.
"""
from __future__ import annotations

import importlib
import json
import os
import runpy
import select
import sys
import traceback


def run_child(request: dict) -> None:
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["log"]), (2, request.get("err") or request["log"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.close(null)
    sys.stdin = open(0, closefd=False)
    os.environ.clear()
    os.environ.update(request["env"])
    if request.get("cwd"):
        os.chdir(request["cwd"])
    script = request["script"]
    module = script[3:] if script.startswith("-m ") else None
    sys.argv = [script, *request["argv"]]
    sys.path[0] = os.getcwd() if module else os.path.dirname(os.path.abspath(script))  # as `python` sets it
    code: object = 0
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # what the interpreter would print for an uncaught exception
        traceback.print_exc()
        code = 1
    raise SystemExit(code)  # the interpreter's own exit: atexit handlers, loader workers joined, streams flushed


def reap(status_dir: str) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = os.path.join(status_dir, str(pid))
        with open(path + ".tmp", "w") as f:
            f.write(str(os.waitstatus_to_exitcode(status)))
        os.replace(path + ".tmp", path)


def serve(status_dir: str) -> None:
    requests = sys.stdin.buffer
    while True:
        ready, _, _ = select.select([requests], [], [], 0.05)
        reap(status_dir)
        if not ready:
            continue
        line = requests.readline()
        if not line:
            return
        pid = os.fork()
        if pid == 0:
            run_child(json.loads(line))  # raises SystemExit: never comes back into this loop
        sys.stdout.write(json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    for module in sys.argv[2:]:
        importlib.import_module(module)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    serve(sys.argv[1])
