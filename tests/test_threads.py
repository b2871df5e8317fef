"""torch's intra-op threads: each process's share of its cores less its loader workers, unless the user set
OMP_NUM_THREADS; the start-up banner says which and why."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from distill.engine import threads
from distill.engine.progress import banner


@pytest.mark.parametrize("cores, processes, workers, expected", [
    (2, 1, 0, 2),  # all cores, nothing else to leave room for
    (2, 1, 4, 1),  # more workers than cores: at least one thread
    (16, 1, 4, 12),
    (96, 8, 4, 8),  # 12 cores a process, 4 of them for its workers
    (8, 16, 0, 1),  # more processes than cores
])
def test_threads_are_a_share_of_the_cores_less_the_workers(cores, processes, workers, expected):
    chosen, why = threads.choose_threads(cores, processes, workers)
    assert chosen == expected
    assert f"{cores} core" in why and f"{processes} process" in why and f"{workers} loader worker" in why


@pytest.mark.parametrize("setting, expected", [("3", 3), ("", 1), ("0", 1), ("two", 1), (None, 1)])
def test_a_valid_omp_num_threads_wins(setting, expected):
    chosen, why = threads.choose_threads(2, 1, 4, setting)
    assert chosen == expected
    assert ("OMP_NUM_THREADS=3" == why) == (expected == 3)


def test_omp_num_threads_in_the_environment_wins(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    try:
        assert threads.set_threads(workers=0) == "3 (OMP_NUM_THREADS=3)" and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_the_banner_says_what_was_chosen_and_why(monkeypatch):
    accelerator = SimpleNamespace(num_processes=1, mixed_precision="no", device="cpu", is_main_process=True)
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_chosen", None)
    assert f"torch threads {before} (torch's default)" in banner(accelerator, "demo", "out", batch_size=8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cores = len(os.sched_getaffinity(0))
    try:
        chosen = threads.set_threads(workers=cores)  # as many workers as cores: one thread
        assert torch.get_num_threads() == 1
        text = banner(accelerator, "demo", "out", batch_size=8)
        assert f"torch threads 1 ({cores} core" in text and f"{cores} loader worker" in text and chosen in text
    finally:
        torch.set_num_threads(before)
