"""What a detection run leaves to look at: best and last checkpoints, the per-class AP table, the pictures."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from distill.detection.report import class_table, write_plots
from distill.engine.checkpoint import list_checkpoints
from test_det_train import finetune, world  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py

# 10 steps of 2 an epoch, evaluated every epoch, every step checkpointed and kept
EVERY_EPOCH = ["train.eval_every=2", "train.ckpt_every=2", "train.keep_ckpts=100"]
PNG = b"\x89PNG\r\n\x1a\n"


def evaluations(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "AP" in r]


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):  # noqa: F811
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("report") / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    summary = finetune(world, out, *EVERY_EPOCH)
    AcceleratorState._reset_state(reset_partial_state=True)
    return out, summary


def test_best_is_the_evaluation_with_the_highest_ap_and_last_the_newest_checkpoint(run):
    out, summary = run
    evals = evaluations(out)
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10]
    top = max(evals, key=lambda r: r["AP"])  # the first of equals, as the run keeps it
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["step"] == top["step"] and best["metrics"]["AP"] == pytest.approx(top["AP"])
    assert summary["best"] == {"AP": pytest.approx(top["AP"]), "step": top["step"]}
    # the weights evaluated then: the EMA of that step's checkpoint
    at_best = torch.load(out / f"ckpt-{top['step']:08d}.pt", weights_only=True)
    assert all(torch.equal(best["ema"][k], at_best["ema"][k]) for k in at_best["ema"])
    assert os.path.samefile(out / "last.pt", list_checkpoints(out)[-1])
    # each checkpoint carries the best so far, its own step's evaluation included (the final evaluation
    # follows the last checkpoint), for a resumed run to compare against
    for path in list_checkpoints(out):
        step = int(path.stem.split("-")[1])
        so_far = max((r for r in evals[:-1] if r["step"] <= step), key=lambda r: r["AP"])
        progress = torch.load(path, weights_only=True)["progress"][0]
        assert (progress["best_ap"], progress["best_step"]) == (pytest.approx(so_far["AP"]), so_far["step"]), path


def test_per_class_table_comes_from_the_same_evaluation(run, world):  # noqa: F811
    out, summary = run
    rows = summary["per_class"]
    annotations = json.loads((world / "shapes" / "train" / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in annotations["categories"]}
    assert [(r["id"], r["name"]) for r in rows] == sorted(names.items())
    assert sum(r["gt"] for r in rows) == len(annotations["annotations"])
    scored = [r for r in rows if r["gt"] > 0]
    # COCO's AP and AP50 are the means over the classes of these same rows
    assert sum(r["AP"] for r in scored) / len(scored) == pytest.approx(summary["AP"], abs=1e-6)
    assert sum(r["AP50"] for r in scored) / len(scored) == pytest.approx(summary["AP50"], abs=1e-6)
    assert "per_class" not in summary["metrics"] and "pr50" not in summary["metrics"]
    for name in ("curves.png", "pr_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG, name


def test_predict_and_export_take_best_pt(run, world, tmp_path):  # noqa: F811
    from distill.export.__main__ import main as export_main
    from distill.predict import main as predict_main

    out, _ = run
    images = world / "shapes" / "train" / "images"
    predicted = predict_main([str(out / "best.pt"), str(images), "--out", str(tmp_path / "pred"), "--num-workers", "0",
                              "--device", "cpu"])
    assert predicted is not None and (tmp_path / "pred" / "predictions.json").is_file()
    export_main([str(out / "best.pt"), "--to", "onnx", "--out", str(tmp_path / "onnx")])
    assert (tmp_path / "onnx" / "model.onnx").stat().st_size > 0
    from distill.detection.pretrained import read_detector_weights

    assert read_detector_weights(out / "best.pt")[1] == "ours"  # model.init_from takes it as well


def test_resumed_run_keeps_the_best_of_before_the_interruption(run, world, tmp_path):  # noqa: F811
    """Cut after step 6 and resumed, the run ends with the uninterrupted run's evaluations and best; and a
    resumed run measures new evaluations against the best its checkpoint records, not against nothing."""
    import shutil

    whole, summary = run
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for name in ("ckpt-00000008.pt", "ckpt-00000010.pt", "last.pt", "summary.json", "best.pt"):
        (cut / name).unlink()
    ckpt = torch.load(cut / "ckpt-00000006.pt", weights_only=True)
    recorded = (ckpt["progress"][0]["best_ap"], ckpt["progress"][0]["best_step"])
    assert recorded[1] in (2, 4, 6) and recorded[0] >= 0
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("".join(f"{l}\n" for l in lines if json.loads(l).get("step", 0) <= 6))
    resumed = finetune(world, cut, *EVERY_EPOCH, "resume=auto")
    assert [(r["step"], r["AP"]) for r in evaluations(cut)] == [(r["step"], r["AP"]) for r in evaluations(whole)]
    assert resumed["best"] == summary["best"]
    if summary["best"]["step"] > 6:
        assert torch.load(cut / "best.pt", weights_only=True)["step"] == summary["best"]["step"]

    # the same resume with an unbeatable best on record writes no best.pt and reports the recorded one
    for name in ("ckpt-00000008.pt", "ckpt-00000010.pt", "last.pt", "summary.json", "best.pt"):
        (cut / name).unlink(missing_ok=True)
    for p in ckpt["progress"]:
        p["best_ap"], p["best_step"] = 2.0, 6
    torch.save(ckpt, cut / "ckpt-00000006.pt")
    again = finetune(world, cut, *EVERY_EPOCH, "resume=auto")
    assert again["best"] == {"AP": 2.0, "step": 6} and not (cut / "best.pt").exists()


def test_last_is_a_copy_where_hard_links_fail(tmp_path, monkeypatch):
    from distill.engine.checkpoint import link_atomically

    source = tmp_path / "ckpt-00000001.pt"
    source.write_bytes(b"weights")
    link_atomically(source, tmp_path / "last.pt")
    assert os.path.samefile(source, tmp_path / "last.pt")

    def no_links(*args):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    newer = tmp_path / "ckpt-00000002.pt"
    newer.write_bytes(b"newer weights")
    link_atomically(newer, tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == b"newer weights" and not os.path.samefile(newer, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.pt", "ckpt-00000002.pt", "last.pt"]


def test_plots_are_skipped_with_one_line_without_matplotlib(tmp_path, monkeypatch, caplog):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 0.1}) + "\n")
    rows = [{"id": 1, "name": "disc", "AP": 0.5, "AP50": 0.75, "gt": 3}]
    pr50 = {"recall": [0.0, 1.0], "precision": [[1.0, 0.5]]}
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    with caplog.at_level(logging.INFO, logger="distill"):
        assert write_plots(tmp_path, rows, pr50) == []
    assert [r.message for r in caplog.records if "plots skipped" in r.message] and not list(tmp_path.glob("*.png"))
    monkeypatch.undo()
    assert [p.name for p in write_plots(tmp_path, rows, pr50)] == ["curves.png", "pr_curves.png"]
    assert class_table(rows).splitlines()[1].split() == ["disc", "0.500", "0.750", "3"]


def test_a_cut_short_metrics_line_is_skipped_and_plot_errors_never_fail_the_run(tmp_path, monkeypatch, caplog):
    """A process killed mid-append leaves half a line; the resumed run appends after it."""
    from distill.detection import report

    whole = [{"step": 1, "loss": 1.0, "lr": 0.1}, {"step": 2, "loss": 0.5, "lr": 0.1}]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(whole[0]) + "\n" + '{"step": 2, "lo'
                                            + json.dumps(whole[1]) + "\n" + json.dumps(whole[1]) + "\n")
    assert report.read_metrics(tmp_path / "metrics.jsonl") == [whole[0], whole[1]]
    assert [p.name for p in write_plots(tmp_path, None, None)] == ["curves.png"]

    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "plot_curves", broken)
    with caplog.at_level(logging.WARNING, logger="distill"):
        assert write_plots(tmp_path, None, None) == []
    assert [r.message for r in caplog.records if "No space left on device" in r.message]


def test_resumed_run_keeps_a_best_pt_newer_than_its_checkpoint(run, world, tmp_path):  # noqa: F811
    """Killed after step 8's evaluation wrote best.pt but before its checkpoint: the run resumes from step 6,
    whose record of the best is older, and must not replace the better best.pt with a worse evaluation."""
    import shutil

    whole, _ = run
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for name in ("ckpt-00000008.pt", "ckpt-00000010.pt", "last.pt", "summary.json"):
        (cut / name).unlink()
    best = torch.load(cut / "best.pt", weights_only=True)
    best["step"], best["metrics"]["AP"] = 8, 2.0  # beyond any evaluation of the resumed steps
    torch.save(best, cut / "best.pt")
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("".join(f"{l}\n" for l in lines if json.loads(l).get("step", 0) <= 6))
    resumed = finetune(world, cut, *EVERY_EPOCH, "resume=auto")
    assert resumed["best"] == {"AP": 2.0, "step": 8}
    kept = torch.load(cut / "best.pt", weights_only=True)
    assert (kept["step"], kept["metrics"]["AP"]) == (8, 2.0)


def test_best_pt_goes_to_the_writer_with_the_checkpoint_of_its_step(world, tmp_path, monkeypatch):  # noqa: F811
    """One job holds both files: the training thread never waits for best.pt's write to hand over the
    checkpoint of the same step. A best found by the final evaluation (after the last checkpoint) goes alone."""
    from accelerate.state import AcceleratorState

    from distill.engine.checkpoint import CheckpointWriter

    calls, submit = [], CheckpointWriter.submit

    def recorded(self, state, path, keep, also_as=None, before=()):
        calls.append((Path(path).name, [Path(p).name for _, p in before]))
        return submit(self, state, path, keep, also_as, before)

    monkeypatch.setattr(CheckpointWriter, "submit", recorded)
    AcceleratorState._reset_state(reset_partial_state=True)
    finetune(world, tmp_path / "run", "train.steps=4", "train.eval_every=2", "train.ckpt_every=2")
    AcceleratorState._reset_state(reset_partial_state=True)
    assert calls[:2] == [("ckpt-00000002.pt", ["best.pt"]), ("ckpt-00000004.pt", [])], calls
    assert calls[2:] in ([], [("best.pt", [])]), calls  # the final evaluation's, if better
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["step"] in (2, 4)


def test_the_writer_writes_a_step_s_files_in_one_job(tmp_path):
    from distill.engine.checkpoint import CheckpointWriter, checkpoint_path

    writer = CheckpointWriter()
    for step in (1, 2):
        writer.submit({"w": torch.full((3,), float(step))}, checkpoint_path(tmp_path, step), keep=1,
                      also_as=tmp_path / "last.pt", before=[({"best": torch.ones(2) * step}, tmp_path / "best.pt")])
    writer.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "ckpt-00000002.pt", "last.pt"]
    assert torch.equal(torch.load(tmp_path / "best.pt", weights_only=True)["best"], torch.full((2,), 2.0))
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["w"], torch.full((3,), 2.0))
