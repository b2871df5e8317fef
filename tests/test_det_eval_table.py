"""The backbone comparison table: sizes and compute measured from the built detectors, AP from run folders."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def det_table():
    spec = importlib.util.spec_from_file_location("det_table", ROOT / "scripts" / "det_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(table: str) -> dict[str, list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_table_measures_each_variant_and_reads_ap_from_runs(det_table, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"backbone": "torchvision/shufflenet_v2_x0_5", "AP": 0.4321,
                                                  "AP50": 0.6}))
    timed = ["--img-size", "128", "--iters", "1", "--warmup", "0", "--device", "cpu", "--runs", str(run), "--onnx"]
    small = rows(det_table.main(["--variants", "shufflenet_v2_x0_5,mnv4_conv_small", "--heads", "rtdetrv2", *timed]))
    small |= rows(det_table.main(["--variants", "mnv4_conv_small", "--heads", "dfine", *timed]))
    full = rows(det_table.main(["--variants", "shufflenet_v2_x1_0", "--iters", "0", "--out", str(tmp_path / "t.md")]))
    params, gflops, latency, hf, ratio, onnx, hf_onnx, onnx_ratio, ap, ap50 = small["shufflenet_v2_x0_5"]
    assert float(params) > 1 and float(gflops) > 0 and float(latency) > 0 and (ap, ap50) == ("43.2", "60.0")
    assert float(onnx) > 0 and hf == ratio == hf_onnx == onnx_ratio == "-"  # transformers takes timm backbones only
    for head in ("", ", D-FINE"):  # D-FINE's rows against transformers' DFineForObjectDetection
        _, _, latency, hf, ratio, onnx, hf_onnx, onnx_ratio, _, _ = small["mnv4_conv_small" + head]
        assert all(float(v) > 0 for v in (latency, hf, ratio, onnx, hf_onnx, onnx_ratio))
    # at 640 px with the RT-DETRv2-S neck: the sizes measured independently for this backbone (9.7M, 29.6
    # GFLOPs as 2 x MACs without grid_sample), and the published reference rows alongside
    params, gflops, latency, *_, ap, _ = full["shufflenet_v2_x1_0"]
    assert float(params) == pytest.approx(9.7, abs=0.15) and float(gflops) == pytest.approx(29.6, abs=0.6)
    assert latency == "-" and ap == "-"  # --iters 0, and no run given
    assert full["RT-DETR-L (HGNetv2), reported"][:2] == ["32.8", "108.0"]
    assert full["D-FINE-S (HGNetv2-B0), reported"][:2] == ["10.0", "25.0"]
    assert full["D-FINE-S (HGNetv2-B0), reported"][-2] == "48.5"
    # the D-FINE row beside the RT-DETR one: D-FINE-S's neck and head (deim_base) around the same backbone
    assert list(full).index("shufflenet_v2_x1_0, D-FINE") == list(full).index("shufflenet_v2_x1_0") + 1
    assert 0 < float(full["shufflenet_v2_x1_0, D-FINE"][0]) < float(params)
    assert (tmp_path / "t.md").read_text().count("shufflenet_v2_x1_0") == 2
    # a run's AP goes to the row of its head
    (run / "summary.json").write_text(json.dumps({"backbone": "torchvision/shufflenet_v2_x0_5", "AP": 0.5,
                                                  "AP50": 0.7, "config": {"model": {"head": "dfine"}}}))
    dfine = rows(det_table.main(["--variants", "shufflenet_v2_x0_5", "--img-size", "128", "--iters", "0",
                                 "--runs", str(run)]))
    assert dfine["shufflenet_v2_x0_5, D-FINE"][-2:] == ["50.0", "70.0"] and dfine["shufflenet_v2_x0_5"][-2] == "-"


def test_unknown_variant_or_head_is_refused(det_table):
    with pytest.raises(SystemExit, match="unknown variants"):
        det_table.main(["--variants", "resnet50"])
    with pytest.raises(SystemExit, match="--heads takes rtdetrv2, dfine"):
        det_table.main(["--heads", "yolo"])
