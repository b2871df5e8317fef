"""Stop signals, the background checkpoint writer and named collective failures, in one process. The launches that
stop on signals, resume bitwise and name a missing process are in test_demo, test_det_cluster and test_cluster."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from distill.engine import checkpoint
from distill.engine.checkpoint import CheckpointWriter, list_checkpoints, load_checkpoint
from distill.engine.preemption import (
    CollectiveTimeout,
    StopAgreement,
    StopSignals,
    parse_signal,
    timeouts_named,
)
from distill.errors import ConfigError


@pytest.fixture
def signals():
    stop = StopSignals().install(["SIGTERM", "usr1"])
    yield stop
    stop.uninstall()


def test_stop_signals_are_recorded_not_fatal_and_the_first_one_counts(signals):
    agreement = StopAgreement(timeout_s=5, signals=signals)
    assert not agreement.agreed(1)
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.received == "SIGUSR1" and signals.count == 2
    assert agreement.agreed(2) and agreement.finish(2)  # one process: the answer is its own


def test_handlers_are_given_back():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals().install(["SIGTERM"])
    assert signal.getsignal(signal.SIGTERM) != before
    stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_unknown_signal_name_is_refused_with_examples():
    assert parse_signal("SIGUSR2") == signal.SIGUSR2 and parse_signal("term") == signal.SIGTERM
    with pytest.raises(ConfigError, match="cluster.stop_signals: unknown signal 'SIGFOO'; use names such as SIGTERM"):
        parse_signal("SIGFOO")


def test_signals_during_a_checkpoint_write_do_not_cut_it_short(signals, tmp_path, monkeypatch):
    """The write runs on the writer's thread while the training thread takes signals; the file is whole and the
    training thread goes on at once, with the state as it was when handed over."""
    started = threading.Event()
    save = checkpoint.atomic_save

    def slow_save(obj, path):
        started.set()
        time.sleep(0.5)
        save(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_save", slow_save)
    weights = torch.randn(256, 256)
    expected = weights.clone()
    writer = CheckpointWriter()
    writer.submit({"student": {"w": weights}}, checkpoint.checkpoint_path(tmp_path, 7), keep=2)
    started.wait(5)
    weights.add_(1)  # training goes on: the checkpoint holds the state it was given
    for _ in range(3):
        os.kill(os.getpid(), signal.SIGTERM)
    writer.wait()
    assert signals.count == 3
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000007.pt"]
    assert not list(tmp_path.glob(".*.tmp"))
    assert torch.equal(load_checkpoint(tmp_path / "ckpt-00000007.pt")["student"]["w"], expected)


def test_a_failed_write_is_raised_in_the_training_thread(tmp_path, monkeypatch):
    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_save", full_disk)
    writer = CheckpointWriter()
    writer.submit({"w": torch.zeros(1)}, tmp_path / "ckpt-00000001.pt", keep=2)
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    writer.wait()  # reported once


def test_a_timed_out_collective_is_named_with_its_step_and_timeout():
    step = [41]
    with pytest.raises(CollectiveTimeout, match=r"process 0, step 42: .* \(cluster.timeout_s=30\)"):
        with timeouts_named(lambda: step[0] + 1, 30):
            raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv")
    with pytest.raises(ValueError):  # anything else passes through untouched
        with timeouts_named(1, 30):
            raise ValueError("not a collective")
