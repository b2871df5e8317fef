import errno
import os

import pytest
import torch

from distill.engine.checkpoint import (
    CheckpointMismatch, atomic_save, checkpoint_path, list_checkpoints, load_state_strict, prune_checkpoints,
    resolve_resume,
)


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = checkpoint_path(tmp_path, 10)
    atomic_save({"w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_resume_auto_takes_newest_readable(tmp_path):
    for step in (5, 10, 15):
        atomic_save({"step": step}, checkpoint_path(tmp_path, step))
    checkpoint_path(tmp_path, 20).write_bytes(b"truncated")  # e.g. copied in by hand, cut short
    assert resolve_resume("auto", tmp_path) == checkpoint_path(tmp_path, 15)
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path / "empty") is None
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000015.pt", "ckpt-00000020.pt"]
    with pytest.raises(FileNotFoundError):
        resolve_resume(str(tmp_path / "nope.pt"), tmp_path)


@pytest.mark.parametrize("cut", [0.5, -10])  # torch.load: RuntimeError; within the zip directory: OSError EINVAL
def test_resume_auto_skips_a_checkpoint_cut_short(tmp_path, cut):
    atomic_save({"w": torch.ones(3)}, checkpoint_path(tmp_path, 5))
    whole = checkpoint_path(tmp_path, 5).read_bytes()
    checkpoint_path(tmp_path, 10).write_bytes(whole[:int(len(whole) * cut) if cut > 0 else cut])
    assert resolve_resume("auto", tmp_path) == checkpoint_path(tmp_path, 5)


def test_resume_auto_never_starts_afresh_over_unreadable_checkpoints_nor_goes_back_past_an_unsafe_one(tmp_path):
    checkpoint_path(tmp_path, 5).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="none of the 1 checkpoints"):
        resolve_resume("auto", tmp_path)
    atomic_save({"step": 10, "f": print}, checkpoint_path(tmp_path, 10))  # whole, but would run code
    with pytest.raises(CheckpointMismatch, match="refusing to load .*ckpt-00000010.pt"):
        resolve_resume("auto", tmp_path)


def test_resume_auto_stops_on_a_read_error_rather_than_go_back(tmp_path, monkeypatch):
    """EIO, ESTALE or a timeout of a network file system says nothing of the file: going back to the one before
    would lose the steps since, and the newer file would be picked again at the next start."""
    for step in (5, 10):
        atomic_save({"step": step}, checkpoint_path(tmp_path, step))

    def failing_load(f, *args, **kwargs):
        raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(OSError, match="cannot read checkpoint .*ckpt-00000010.pt: Stale") as e:
        resolve_resume("auto", tmp_path)
    assert e.value.errno == errno.ESTALE


def test_mismatch_names_keys():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.weight"] = torch.zeros(5, 3)
    del state["0.bias"]
    state["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch) as e:
        load_state_strict(model, state)
    msg = str(e.value)
    assert "0.bias" in msg and "extra" in msg and "1.weight" in msg and "(5, 3)" in msg
