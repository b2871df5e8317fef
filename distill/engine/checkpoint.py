"""Checkpoints: written atomically (temporary file in the same folder, fsync, rename), found by step.

A checkpoint is one `torch.save` file `ckpt-<step>.pt` holding plain state dicts; which keys it holds is
up to the caller (pretraining and detection store different things). Every checkpoint, resume file and
teacher is read with `weights_only=True`: tensors and plain containers only, so a file from elsewhere cannot
run code when it is opened. Loading a state dict into a model that does not match names the missing,
unexpected and mis-shaped keys. Files get the permissions of any file the user creates (not mkstemp's 0600),
so a team can read a shared run folder.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from distill.errors import CheckpointMismatch

CKPT_PATTERN = re.compile(r"ckpt-(\d+)\.pt$")
# a checkpoint's write in progress (best.pt and last.pt included)
CKPT_TEMP_PATTERN = re.compile(r"\.(ckpt-\d+|best|last)\.pt\.[A-Za-z0-9_]+\.tmp")
logger = logging.getLogger("distill")


def _file_mode() -> int:
    """The mode of a file the user creates. Linux tells the umask in /proc without changing it; setting it to
    read it back would, for an instant, make the whole process (the training thread's own files too) create
    world-writable files."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
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

    def submit(self, state: dict, path: Path, keep: int, also_as: Optional[Path] = None,
               before: Sequence[tuple[dict, Path]] = ()) -> None:
        """`keep` 0: no pruning (a file beside the numbered checkpoints, e.g. best.pt); `also_as`: a second
        name the file gets once written (`link_atomically`), e.g. last.pt. `before`: (state, path) files of the
        same step written first in the same job (best.pt beside a checkpoint), so the training thread never
        waits for one of them to finish before handing over the other."""
        self.wait()  # one write in flight: a second copy of the state at most
        snapshot = detached_copy(state)
        extra = [(detached_copy(s), Path(p)) for s, p in before]
        self._thread = threading.Thread(target=self._write, args=(snapshot, Path(path), keep, also_as, extra),
                                        name="checkpoint-writer")  # not a daemon: the process exits after it
        self._thread.start()

    def _write(self, state: dict, path: Path, keep: int, also_as: Optional[Path] = None,
               before: Sequence[tuple[dict, Path]] = ()) -> None:
        try:
            for extra_state, extra_path in before:
                atomic_save(extra_state, extra_path)
                logger.info("checkpoint %s", extra_path)
            atomic_save(state, path)
            if also_as is not None:
                link_atomically(path, also_as)
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


def link_atomically(source: Path, name: Path) -> None:
    """`name` becomes the file `source` (a hard link: no second copy on disk, and it outlives the pruning of
    `source`), replaced in one rename so a reader never finds it half there; a copy where links fail."""
    tmp = Path(name).with_name(f".{Path(name).name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # a file system without hard links
        with open(source, "rb") as src:
            return _atomic_write(name, lambda f: shutil.copyfileobj(src, f, 1 << 24))
    os.replace(tmp, name)


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
        raise CheckpointMismatch(  # whole, but unsafe: a resume stops here rather than go back past it
            f"refusing to load {path}: it holds Python objects beyond tensors and plain containers, and "
            f"unpickling them could run code ({detail.strip()[:300]}). If you trust the file, re-save its "
            f"state dict alone (torch.save(obj['state_dict'], ...)) or as safetensors."
        ) from None
    except Exception as e:
        if isinstance(e, OSError) and e.errno != errno.EINVAL:  # the file system failed (EIO, ESTALE, a
            raise OSError(e.errno, f"cannot read checkpoint {path}: {e.strerror or e}") from None  # timeout)
        kind = CorruptCheckpoint if _cut_short(e) else CheckpointMismatch
        raise kind(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


class CorruptCheckpoint(CheckpointMismatch):
    """A file that is no whole checkpoint: cut short outside the atomic write, or no checkpoint at all. A read
    error of the file system is an OSError instead (the file may be whole), and a file holding Python objects a
    plain CheckpointMismatch: neither sends a resume back to an older checkpoint."""


def _cut_short(exc: Exception) -> bool:
    """Whether torch.load's `exc` says the file ends early or is no checkpoint: a file that ends before its zip
    directory does gives RuntimeError, one cut within that directory OSError EINVAL."""
    if isinstance(exc, (EOFError, zipfile.BadZipFile, OSError)):
        return True
    return isinstance(exc, RuntimeError) and any(
        sign in str(exc) for sign in ("failed reading zip archive", "_use_new_zipfile_serialization"))


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
    """`auto` picks the newest readable checkpoint in `folder` (None when there is none). A run's processes
    call it on the main process only and share the answer (engine/resume.py): a read error on one of them
    would otherwise send it back to an older checkpoint than the rest."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"resume={resume}: no such checkpoint")
        return path
    found = list_checkpoints(folder)
    for path in reversed(found):
        try:
            load_checkpoint(path, mmap=True)
            return path
        except CorruptCheckpoint as exc:  # cut short outside the atomic write: try the older one (a read
            logger.warning("%s; trying the one before", exc)  # error stops the run: the file may be whole)
    if found:  # never a silent fresh start over a run's checkpoints
        raise CorruptCheckpoint(f"none of the {len(found)} checkpoints in {folder} can be read (see the warnings "
                                f"above): move them away to start afresh, or overwrite=true")
    return None


def remove_stale_temps(folder: Path) -> int:
    """Delete the temporary files of checkpoint writes cut short in `folder`; returns the bytes freed.

    A process killed outright during a write (SIGKILL: the OOM killer, a scheduler past its grace time) never
    runs `_atomic_write`'s clean-up, and its checkpoint-sized file stays; requeue after requeue they fill the
    disk. Call this before the run's first checkpoint write into `folder`: a temporary file of a write in
    flight looks the same."""
    folder, freed, removed = Path(folder), 0, 0
    for path in folder.iterdir() if folder.is_dir() else []:
        if CKPT_TEMP_PATTERN.fullmatch(path.name):
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:  # left for a later run: not worth stopping this one
                logger.warning("cannot remove the temporary checkpoint %s: %s", path, exc)
                continue
            freed, removed = freed + size, removed + 1
    if removed:
        logger.info("removed %d temporary checkpoint file(s) of interrupted writes from %s: %d bytes", removed,
                    folder, freed)
    return freed


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
