"""Resuming: every process from the checkpoint the main process chose, or every process stops with one line; and
the temporary files of checkpoint writes cut short by a SIGKILL are removed when a run starts in its folder.

The multi-process runs fail one process's read of the newest checkpoint (tests/unreadable_checkpoint.py: EIO from
`torch.load` for that file, in that process only), as a network file system failing on one node would."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from launches import finish, ranks, torchrun

from distill.data.synthetic import generate_classification
from distill.data.synthetic_coco import generate_coco_shapes
from distill.engine.checkpoint import (
    _atomic_write,
    atomic_save,
    checkpoint_path,
    load_checkpoint,
    remove_stale_temps,
)
from distill.engine.resume import choose_resume, disagreement
from distill.models.factory import create_model

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
PRETRAIN, FINETUNE = str(ROOT / "distill" / "pretrain.py"), str(ROOT / "distill" / "finetune_det.py")
UNREADABLE = str(TESTS / "unreadable_checkpoint.py")
PROCESSES, STEPS = 3, 4  # checkpoints at steps 2 and 4
NEWEST, OLDER = "ckpt-00000004.pt", "ckpt-00000002.pt"


# --------------------------------------------------------------------------------------------------
# The main process's choice, and what the processes' outcomes say
# --------------------------------------------------------------------------------------------------


def test_every_process_loaded_alike_is_agreement():
    assert disagreement(Path("ckpt-00000004.pt"), [(None, 4)] * 4) is None


def test_a_process_that_cannot_read_the_file_is_named_in_one_line():
    path = Path("/runs/a/ckpt-00000004.pt")
    outcomes = [(None, 4), ("CheckpointMismatch: cannot read checkpoint x: OSError: [Errno 5] EIO\nmore", None),
                (None, 4), ("OSError: [Errno 116] Stale file handle", None)]
    message = disagreement(path, outcomes)
    assert "\n" not in message and str(path) in message
    assert "processes 1, 3 of 4" in message and "Errno 5" in message


def test_processes_at_other_steps_than_the_main_one_are_named():
    message = disagreement(Path("ckpt-00000004.pt"), [(None, 4), (None, 2), (None, 4), (None, 3)])
    assert "\n" not in message
    assert "process 0 stands at step 4 but process 1 at step 2, process 3 at step 3:" in message


@pytest.fixture
def single_process():
    """choose_resume on this process alone, as a one-process run would call it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_main_process_skips_a_file_it_cannot_read(single_process, tmp_path, caplog):
    for step in (2, 4):
        atomic_save({"step": step}, checkpoint_path(tmp_path, step))
    checkpoint_path(tmp_path, 6).write_bytes(b"cut short")
    assert choose_resume("auto", tmp_path) == checkpoint_path(tmp_path, 4)
    assert f"cannot read checkpoint {checkpoint_path(tmp_path, 6)}" in caplog.text  # said, not silent
    assert choose_resume(None, tmp_path) is None
    with pytest.raises(OSError, match="nope.pt"):
        choose_resume(str(tmp_path / "nope.pt"), tmp_path)


# --------------------------------------------------------------------------------------------------
# Temporary files of writes cut short
# --------------------------------------------------------------------------------------------------


def killed_writer(path: Path, size: int) -> Path:
    """Writes checkpoint `path` (`size` bytes) in a child process, SIGKILLed once the bytes are out and before
    the rename: the temporary file the real writer leaves behind."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            os.close(ready_r)

            def stall(f):
                f.write(b"\0" * size)
                f.flush()
                os.write(ready_w, b"1")
                time.sleep(600)

            _atomic_write(path, stall)
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    (temp,) = path.parent.glob(f".{path.name}.*.tmp")
    return temp


def test_a_write_killed_midway_leaves_a_file_that_the_next_start_removes(single_process, tmp_path, caplog):
    atomic_save({"step": 2}, checkpoint_path(tmp_path, 2))
    temp = killed_writer(checkpoint_path(tmp_path, 4), 300_000)
    assert temp.stat().st_size == 300_000
    kept = [tmp_path / ".teacher.pt.ab12cd34.tmp", tmp_path / ".summary.json.ab12cd34.tmp",
            tmp_path / "ckpt-00000004.pt.tmp", tmp_path / "notes.tmp"]  # other files' writes, and a user's
    for path in kept:
        path.write_bytes(b"x")
    (tmp_path / ".ckpt-00000006.pt.q9_zk2mw.tmp").write_bytes(b"\0" * 1000)  # another write cut short
    with caplog.at_level(logging.INFO, logger="distill"):
        assert choose_resume("auto", tmp_path) == checkpoint_path(tmp_path, 2)
    assert not temp.exists() and not (tmp_path / ".ckpt-00000006.pt.q9_zk2mw.tmp").exists()
    assert all(path.exists() for path in kept) and checkpoint_path(tmp_path, 2).exists()
    assert "removed 2 temporary checkpoint file(s)" in caplog.text and "301000 bytes" in caplog.text
    assert remove_stale_temps(tmp_path) == 0  # nothing left; and no run folder yet is no error
    assert remove_stale_temps(tmp_path / "absent") == 0


# --------------------------------------------------------------------------------------------------
# The collective check after loading, on gloo processes
# --------------------------------------------------------------------------------------------------

AGREEMENT = """
import sys
from pathlib import Path
from distill.engine.checkpoint import CheckpointMismatch
from distill.engine.distributed import end_processes, start_processes
from distill.engine.resume import load_everywhere

rank = start_processes(60).process_index
cases = {"agree": lambda: 4, "differ": lambda: [4, 4, 2][rank], "all fail": lambda: 1 / 0}
for case, step in cases.items():  # one after another: each is one collective on every process
    try:
        loaded = load_everywhere(Path("ckpt-00000004.pt"), step, step=lambda loaded: loaded)
        sys.stdout.write(f"{case}: process {rank} at step {loaded}\\n")  # one write: the log is shared
    except (CheckpointMismatch, ZeroDivisionError) as exc:
        sys.stdout.write(f"{case}: process {rank} stopped: {type(exc).__name__}: {exc}\\n")
end_processes()
"""


def test_processes_check_together_that_they_loaded_alike(tmp_path):
    """Processes that loaded alike go on; processes at other steps than the main one are named in one line, on
    every process; a failure every process shares is raised as it is."""
    script = tmp_path / "agreement.py"
    script.write_text(AGREEMENT)
    out, log = tmp_path / "agreement", Path(f"{tmp_path / 'agreement'}.log")
    assert wait_all(ranks(str(script), PROCESSES, out), log) == [0] * PROCESSES, log.read_text()
    lines = log.read_text().splitlines()
    assert sorted(line for line in lines if line.startswith("agree:")) == [
        f"agree: process {rank} at step 4" for rank in range(PROCESSES)]
    differ = [line.split(": ", 2)[2] for line in lines if line.startswith("differ:")]
    assert len(differ) == PROCESSES and len(set(differ)) == 1, lines
    assert differ[0].startswith("CheckpointMismatch: after loading ckpt-00000004.pt, process 0 stands at step 4 "
                                "but process 2 at step 2:"), differ[0]
    failed = [line.split(": ", 2)[2] for line in lines if line.startswith("all fail:")]
    assert failed == ["ZeroDivisionError: division by zero"] * PROCESSES, lines


CHOICE = """
import sys
import threading
from pathlib import Path
from distill.engine import resume
from distill.engine.checkpoint import CheckpointMismatch
from distill.engine.distributed import end_processes, start_processes


class Unpicklable(Exception):
    def __init__(self):
        super().__init__("holds a lock")
        self.lock = threading.Lock()


rank = start_processes(20).process_index
for problem in (KeyError("student"), CheckpointMismatch("ckpt-00000004.pt: no progress"), Unpicklable()):
    def failing(*args, problem=problem):
        raise problem
    resume.resolve_resume = failing
    try:
        resume.choose_resume("auto", Path("absent"))
    except Exception as exc:
        sys.stdout.write(f"process {rank} stopped: {type(exc).__name__}: {exc}\\n")  # one write: a shared log
end_processes()
"""


def test_any_failure_of_the_main_process_choice_stops_every_process(tmp_path):
    """Not only a read error: whatever the main process's choice raises reaches every process (as a string: an
    exception need not pickle), a user error as one of the same kind."""
    script = tmp_path / "choice.py"
    script.write_text(CHOICE)
    out, log = tmp_path / "choice", Path(f"{tmp_path / 'choice'}.log")
    assert wait_all(ranks(str(script), PROCESSES, out), log, timeout=120) == [0] * PROCESSES, log.read_text()
    lines = [line.split(": ", 1)[1] for line in log.read_text().splitlines() if " stopped: " in line]
    assert sorted(lines) == sorted(["RuntimeError: KeyError: 'student'", "RuntimeError: Unpicklable: holds a lock",
                                    "CheckpointMismatch: ckpt-00000004.pt: no progress"] * PROCESSES), lines


# --------------------------------------------------------------------------------------------------
# The entry points, 3 processes, the newest checkpoint unreadable on one of them
# --------------------------------------------------------------------------------------------------


def wait_all(procs: list, log: Path, timeout: float = 480) -> list[int]:
    """Every process's own exit status; all are killed when they do not end in time (a hang: a failure)."""
    deadline = time.time() + timeout
    try:
        return [proc.wait(timeout=max(1.0, deadline - time.time())) for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
        raise AssertionError(f"the processes did not end within {timeout} s:\n" + log.read_text()[-4000:]) from None


def copied(finished: Path, out: Path) -> Path:
    """A copy of the finished run `finished` in `out`, to resume."""
    shutil.copytree(finished, out)
    (out / "summary.json").unlink()
    return out


def resume_with_unreadable(entry: str, out: Path, rank: int, monkeypatch, *args: str) -> tuple[list[int], str]:
    """The run in `out` resumed by 3 processes of `entry` (each with its own exit status) while process `rank`
    (-1: none) cannot read the newest checkpoint; the statuses and the launch's log."""
    monkeypatch.setenv("ENTRY", entry)
    monkeypatch.setenv("UNREADABLE_RANK", str(rank))
    monkeypatch.setenv("UNREADABLE_FILE", NEWEST)
    log = Path(f"{out}.log")
    codes = wait_all(ranks(UNREADABLE, PROCESSES, out, *args, "resume=auto", "cluster.timeout_s=180"), log)
    return codes, log.read_text()


def error_lines(log: str, ending: str) -> list[str]:
    """The `error: ...` lines in a log the processes share, each up to `ending`: found anywhere, as two processes'
    lines may still run into one another there."""
    return re.findall(rf"error: [^\n]*?{re.escape(ending)}", log)


def assert_stopped_in_one_line(codes: list[int], log: str, rank: int) -> None:
    errors = error_lines(log, "to resume from the one before")
    assert codes == [2] * PROCESSES, log[-4000:]
    assert len(errors) == PROCESSES and len(set(errors)) == 1, log[-4000:]  # each process, the same line
    assert NEWEST in errors[0] and f"process {rank} of {PROCESSES} could not load" in errors[0], errors[0]
    assert "Traceback" not in log and "resumed from" not in log


def assert_same_tensors(a, b, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory):
    """A finished 3-process pretraining run of 4 steps with checkpoints at steps 2 and 4, and its recipe."""
    root = tmp_path_factory.mktemp("resume_pretrain")
    generate_classification(root / "shapes", num_classes=4, train_per_class=20, val_per_class=3, img_size=16,
                            seed=0, shard_size=40)
    (root / "mix.yaml").write_text("sources:\n  a: {shards: shapes/train, augment: {name: inception}}\n")
    atomic_save({"model": create_model("test_resnet", num_classes=4).state_dict()}, root / "teacher.pt")
    recipe = root / "tiny.yaml"
    recipe.write_text(
        f"student: {{name: test_resnet, num_classes: 4, drop_rate: 0.1}}\n"
        f"teacher: {{name: test_resnet, pretrained: false, checkpoint: {root / 'teacher.pt'}}}\n"
        f"data: {{mix: {root / 'mix.yaml'}, root: {root}, img_size: 16, batch_size: 4, num_workers: 0,\n"
        f"        val_shards: shapes/val, val_batch_size: 12}}\n"
        f"optim: {{lr: 0.003, warmup_steps: 1}}\n"
        f"train: {{steps: {STEPS}, log_every: 2, ckpt_every: 2, keep_ckpts: 5, trackers: [jsonl]}}\n")
    out = root / "run"
    finish(torchrun(PRETRAIN, PROCESSES, out, f"recipe={recipe}"), out)
    return out, recipe


def test_pretraining_stops_every_process_when_one_cannot_read_the_chosen_checkpoint(pretraining, tmp_path,
                                                                                    monkeypatch):
    finished, recipe = pretraining
    out = copied(finished, tmp_path / "run")
    codes, log = resume_with_unreadable(PRETRAIN, out, 1, monkeypatch, f"recipe={recipe}")
    assert_stopped_in_one_line(codes, log, 1)
    assert not (out / "summary.json").exists()


def test_pretraining_resumes_every_process_from_the_main_process_choice(pretraining, tmp_path, monkeypatch):
    """The newest checkpoint is cut short: all resume from the one before, and train on to the very state the
    uninterrupted run reached. A checkpoint-sized temporary file of a write cut short goes."""
    finished, recipe = pretraining
    out = copied(finished, tmp_path / "run")
    size = (out / NEWEST).stat().st_size
    (out / NEWEST).write_bytes((out / NEWEST).read_bytes()[:size // 2])
    leftover = out / ".ckpt-00000006.pt.k1ll3d_x.tmp"
    leftover.write_bytes(b"\0" * size)
    codes, log = resume_with_unreadable(PRETRAIN, out, -1, monkeypatch, f"recipe={recipe}")
    assert codes == [0] * PROCESSES, log[-4000:]
    assert f"cannot read checkpoint {out / NEWEST}" in log and f"resumed from {out / OLDER} at step 2" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and len(set(summary["process_weight_checksums"])) == 1
    a, b = load_checkpoint(finished / NEWEST), load_checkpoint(out / NEWEST)
    for part in ("student", "ema", "optimizer", "progress"):
        assert_same_tensors(a[part], b[part], part)
    assert not leftover.exists() and f"{size} bytes" in log


@pytest.fixture(scope="module")
def detection(tmp_path_factory):
    """A finished 3-process detection run of 4 steps with checkpoints at steps 2 and 4, and its recipe."""
    root = tmp_path_factory.mktemp("resume_det")
    generate_coco_shapes(root / "shapes", num_train=12, num_val=3, img_size=64, num_classes=3, max_objects=2, seed=0)
    recipe = root / "tiny.yaml"
    recipe.write_text(
        "model: {backbone: test_efficientnet, hidden_dim: 32, dim_feedforward: 64, num_heads: 2, num_queries: 10,\n"
        "        num_decoder_layers: 1, num_points: 2, num_denoising: 5}\n"
        f"data: {{root: {root / 'shapes'}, train_images: train/images, train_ann: train/annotations.json,\n"
        "       val_images: val/images, val_ann: val/annotations.json, img_size: 64, batch_size: 2,\n"
        "       val_batch_size: 2, num_workers: 0}\n"
        "optim: {lr: 0.001, backbone_lr: 0.0005, warmup_steps: 1, clip_grad: 1.0}\n"
        f"train: {{steps: {STEPS}, ckpt_every: 2, keep_ckpts: 5, log_every: 2, ema_decay: 0.9, precision: 'no',\n"
        "        trackers: [jsonl]}\n"
        "eval: {visualize: 0}\n")
    out = root / "run"
    finish(torchrun(FINETUNE, PROCESSES, out, f"recipe={recipe}"), out)
    return out, recipe


def test_detection_stops_every_process_when_one_cannot_read_the_chosen_checkpoint(detection, tmp_path, monkeypatch):
    finished, recipe = detection
    out = copied(finished, tmp_path / "run")
    codes, log = resume_with_unreadable(FINETUNE, out, 2, monkeypatch, f"recipe={recipe}")
    assert_stopped_in_one_line(codes, log, 2)
    assert not (out / "summary.json").exists()


def test_detection_stops_every_process_when_the_main_process_cannot_read_the_newest(detection, tmp_path,
                                                                                    monkeypatch):
    """A read error (EIO) says nothing of the file: going back to the one before would lose the steps since, and
    the newer file would be picked again at the next start. Every process stops with one line naming it."""
    finished, recipe = detection
    out = copied(finished, tmp_path / "run")
    codes, log = resume_with_unreadable(FINETUNE, out, 0, monkeypatch, f"recipe={recipe}")
    errors = error_lines(log, "Input/output error")
    assert codes == [2] * PROCESSES and errors == [f"error: [Errno 5] cannot read checkpoint {out / NEWEST}: "
                                                   f"Input/output error"] * PROCESSES, log[-4000:]
    assert "Traceback" not in log and "resumed from" not in log and not (out / "summary.json").exists()


def test_an_error_is_written_to_a_shared_log_in_one_piece(monkeypatch):
    from distill.cli import user_errors

    writes = []
    monkeypatch.setattr("sys.stderr", type("Stderr", (), {"write": lambda self, text: writes.append(text),
                                                         "flush": lambda self: None})())
    with pytest.raises(SystemExit), user_errors():
        raise OSError("cannot read checkpoint ckpt-00000004.pt")
    assert writes == ["error: cannot read checkpoint ckpt-00000004.pt\n"]
