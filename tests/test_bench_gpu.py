"""The prepared GPU benchmark stays runnable: its quick form runs every row on the CPU at tiny sizes; the wheels
that carry its dependencies to a GPU machine cover what pyproject asks for."""
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import launches

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_gpu  # noqa: E402
import gpu_wheels  # noqa: E402


def test_quick_smoke_run_prints_every_row_with_a_ratio():
    proc = launches.run(str(SCRIPTS / "bench_gpu.py"), "--quick", "--smoke", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("device: CPU") and "| figure | measured | ratio | target |" in out
    for row in ("compute bound", "online KD: ours vs timm", "offline: real shards", "host syncs in the training step",
                "RT-DETR train step", "RT-DETR batch-1 latency"):
        line = next((line for line in out.splitlines() if row in line), None)
        assert line is not None, (row, out)
        if row not in ("compute bound", "host syncs in the training step"):
            assert re.search(r"\| \d+\.\d\dx", line) and ("| met |" in line or "not met" in line), line
    assert "| not counted on the CPU |" in out
    assert re.search(r"seconds per row, compiling included: compute bound \d+ s, online \d+ s, offline \d+ s, "
                     r"RT-DETR \d+ s", out), out


def test_host_syncs_counts_what_the_sync_debug_mode_reports(monkeypatch):
    """The CUDA path of the sync row, driven without a GPU: the mode is on only while the steps run."""
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step():
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("an unrelated warning")

    assert bench_gpu.host_syncs(step, 3, torch.device("cuda")) == 3
    assert modes == ["warn", "default"]

    def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        bench_gpu.host_syncs(failing, 1, torch.device("cuda"))
    assert modes[-1] == "default"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert bench_gpu.host_syncs(step, 2, torch.device("cpu")) is None


def test_wheels_cover_every_dependency_the_gpu_image_lacks():
    deps = tomllib.loads((SCRIPTS.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {Requirement(r).name: Requirement(r) for r in gpu_wheels.requirements()}
    for dep in map(Requirement, deps):
        name = gpu_wheels.canonical(dep.name)
        assert name in gpu_wheels.IMAGE or name in pins, f"{dep.name}: neither in the GPU image nor carried"
        if name in pins:
            (pin,) = pins[name].specifier
            assert dep.specifier.contains(pin.version), f"{name}=={pin.version} is outside pyproject's {dep}"
    assert set(pins) == {"webdataset", "torchdata", "albumentations", "omegaconf", "braceexpand",
                         "faster-coco-eval", "simplejpeg"}
