"""Checkpoints: written atomically (temporary file in the same folder, fsync, rename), found by step.

A checkpoint is one `torch.save` file `ckpt-<step>.pt` holding plain state dicts; which keys it holds is
up to the caller (pretraining and detection store different things). Every checkpoint, resume file and
teacher is read with `weights_only=True`: tensors and plain containers only, so a file from elsewhere cannot
run code when it is opened. Loading a state dict into a model that does not match names the missing,
unexpected and mis-shaped keys. Files get the permissions of any file the user creates (not mkstemp's 0600),
so a team can read a shared run folder.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

import torch

CKPT_PATTERN = re.compile(r"ckpt-(\d+)\.pt$")
logger = logging.getLogger("distill")


class CheckpointMismatch(ValueError):
    """A state dict that does not fit the model it is loaded into, or a file that is not a safe checkpoint."""


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def detached_copy(obj: Any) -> Any:
    """`obj` with every tensor copied to the CPU: a snapshot that training can go on changing the originals of."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints from a thread of the main process, one at a time. The training step goes on once the
    state is copied to host memory, and the other processes never wait for the disk: at full size a write takes
    seconds to minutes, while a collective held open for it would count against every process's timeout."""

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, state: dict, path: Path, keep: int) -> None:
        self.wait()  # one write in flight: a second copy of the state at most
        snapshot = detached_copy(state)
        self._thread = threading.Thread(target=self._write, args=(snapshot, Path(path), keep),
                                        name="checkpoint-writer")  # not a daemon: the process exits after it
        self._thread.start()

    def _write(self, state: dict, path: Path, keep: int) -> None:
        try:
            atomic_save(state, path)
            prune_checkpoints(path.parent, keep, just_written=path)
            logger.info("checkpoint %s", path)
        except BaseException as e:  # raised in the training thread by the next submit() or wait()
            self._error = e

    def wait(self) -> None:
        """Until the write in flight is on disk; its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_PATTERN.search(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(folder: Path, keep: int, just_written: Optional[Path] = None) -> None:
    """Keep the newest `keep` checkpoints, and always the one just written."""
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        if just_written is None or old.resolve() != Path(just_written).resolve():
            old.unlink(missing_ok=True)


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A checkpoint's contents, read with `weights_only=True`; anything else is refused with a clear error."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        detail = str(e).split("\n\n")[1] if "\n\n" in str(e) else str(e).splitlines()[0]
        raise CheckpointMismatch(
            f"refusing to load {path}: it holds Python objects beyond tensors and plain containers, and "
            f"unpickling them could run code ({detail.strip()[:300]}). If you trust the file, re-save its "
            f"state dict alone (torch.save(obj['state_dict'], ...)) or as safetensors."
        ) from None
    except Exception as e:
        raise CheckpointMismatch(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def resolve_checkpoint(source: str | Path) -> Path:
    """A run folder → its newest checkpoint; a file, or an exported folder (`model.safetensors`), as given."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist (give a run folder or a checkpoint file)")
    if source.is_dir() and not (source / "model.safetensors").exists():
        found = list_checkpoints(source)
        if not found:
            raise FileNotFoundError(f"run folder {source} holds no ckpt-XXXXXXXX.pt checkpoint")
        return found[-1]
    return source


def resolve_resume(resume: Optional[str], folder: Path) -> Optional[Path]:
    """`auto` picks the newest readable checkpoint in `folder` (None when there is none)."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"resume={resume}: no such checkpoint")
        return path
    for path in reversed(list_checkpoints(folder)):
        try:
            load_checkpoint(path, mmap=True)
            return path
        except CheckpointMismatch:
            continue  # a truncated file from a crash outside the atomic write; try the older one
    return None


def describe_mismatch(model: torch.nn.Module, state: dict) -> Optional[str]:
    """None when `state` fits `model` exactly; else a message naming the differing keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if not (missing or unexpected or shapes):
        return None

    def fmt(title: str, items: list[str]) -> str:
        head = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
        return f"  {title} ({len(items)}): {head}" if items else ""

    parts = [fmt("missing", missing), fmt("unexpected", unexpected), fmt("mis-shaped", shapes)]
    return "\n".join(p for p in parts if p)


def load_state_strict(model: torch.nn.Module, state: dict, source: str = "checkpoint") -> None:
    problem = describe_mismatch(model, state)
    if problem:
        raise CheckpointMismatch(f"{source} does not match {type(model).__name__}:\n{problem}")
    model.load_state_dict(state)
