"""Curation of class-balanced extra data: threshold, per-class cap, most-confident-first, fill, report, resume
and bounded bookkeeping. The scorer is a fixed function of an image's colour, so every expected selection is
computed independently here by brute force over the same scores."""
from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from accelerate import Accelerator

from distill import curate
from distill.data.shards import read_manifest
from distill.data.synthetic import generate_classification
from distill.engine.preemption import EXIT_REQUEUE
from distill.passes.curation_state import CurationProgress, ScoreStats, merged
from distill.passes.scoring import EvalRender, score_units
from distill.passes.selection import plan_selection
from distill.passes.topk import ClassTopK, pack, unpack
from distill.passes.units import pool_units, rank_share

NUM_CLASSES = 5  # the fifth class never wins: it stays empty
THRESHOLD, K, IMG = 0.5, 20, 32


class ColourScorer:
    """Logits from an image's mean colour relative to its brightness: deterministic, confidences spread."""

    W = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [-3, -3, -3]])

    def __init__(self, fail_after_calls: int | None = None, signal_at_call: int | None = None):
        self.calls, self.images, self.fail_after_calls, self.signal_at_call = 0, 0, fail_after_calls, signal_at_call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after_calls is not None and self.calls > self.fail_after_calls:
            raise KeyboardInterrupt("interrupted by the test")  # a crash
        if self.calls == self.signal_at_call:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop
        self.images += len(x)
        feats = x.mean((2, 3)) - x.mean((1, 2, 3))[:, None]
        return 4 * feats @ self.W.T


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    # 120 images of 4 classes in skewed shares plus object-free ones, 6 shards of 20
    generate_classification(root / "gen", num_classes=4, train_per_class=0, val_per_class=0, img_size=IMG,
                            seed=0, shard_size=20, extra_per_class=30)
    (root / "base.yaml").write_text(f"""
data_root: {root}
pool: {{shards: gen/extra}}
scorer: {{name: unused, pretrained: false, num_classes: {NUM_CLASSES}, img_size: {IMG}}}
select: {{threshold: {THRESHOLD}, per_class: {K}, fill: repeat, hist_bins: 10}}
batch_size: 8
num_workers: 0
checkpoint_every: 1
maxcount: 16
precision: "no"
""")
    return root


def run(world, out: str, *overrides, scorer=None) -> dict:
    return curate.main([f"recipe={world / 'base.yaml'}", f"output_dir={out}", *overrides],
                       scorer=scorer or ColourScorer())


@pytest.fixture(scope="module")
def reference(world):
    """Every pool image's (class, confidence) by (unit, ordinal), scored outside the pass."""
    scorer, scores = ColourScorer(), {}
    for unit in pool_units("gen/extra", None, world):
        for batch in EvalRender(IMG, 0.875, 64)(unit):
            conf, cls = scorer(batch["image"].float() / 255).softmax(-1).max(-1)
            for o, c, p in zip(batch["ordinal"].tolist(), cls.tolist(), conf.tolist()):
                scores[(unit.index, o)] = (c, p)
    return scores


def expected_kept(reference) -> dict[int, list[tuple[int, int]]]:
    by_class = defaultdict(list)
    for ref, (c, p) in reference.items():
        if p > THRESHOLD:
            by_class[c].append((p, ref))
    return {c: [ref for _, ref in sorted(v, reverse=True)[:K]] for c, v in by_class.items()}


def output_samples(out: Path) -> list[tuple[str, int, bytes]]:
    """(key, class, jpg bytes) of every sample in the output shards."""
    samples = defaultdict(dict)
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                samples[key][ext] = tar.extractfile(m).read()
    return [(k, int(v["cls"]), v["jpg"]) for k, v in samples.items()]


def ref_of(key: str) -> tuple[int, int]:
    unit, ordinal = key.split("_rep")[0].lstrip("u").split("_")
    return int(unit), int(ordinal)


@pytest.fixture(scope="module")
def curated(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "d3"
    summary = run(world, str(out))
    return out, summary


# ---- per-class top-K bookkeeping ------------------------------------------------------------------


def test_topk_keeps_exactly_the_most_confident_and_never_grows_past_k():
    rng = random.Random(0)
    stream = [(rng.randrange(3), rng.random(), u, o) for u in range(40) for o in range(25)]
    top = ClassTopK(3, 7)
    for item in stream:
        top.push(*item)
        assert top.sizes().max() <= 7
    for c in range(3):
        brute = sorted(((p, u, o) for cc, p, u, o in stream if cc == c), reverse=True)[:7]
        got = top.ranked(c)
        assert [(u, o) for _, u, o in got] == [(u, o) for _, u, o in brute]
        assert [p for p, _, _ in got] == pytest.approx([p for p, _, _ in brute], abs=1e-7)
    # split over two "processes" and merged: the same result; and through a checkpoint
    halves = [ClassTopK(3, 7), ClassTopK(3, 7)]
    for i, item in enumerate(stream):
        halves[i % 2].push(*item)
    again = ClassTopK.from_state_dict(ClassTopK.merged(halves).state_dict())
    assert all(again.ranked(c) == top.ranked(c) for c in range(3))


def test_packing_orders_by_confidence_then_position():
    assert unpack(pack(0.25, 3, 9)) == (0.25, 3, 9)
    assert pack(0.5, 0, 0) > pack(0.4999, 2**32 - 1, 2**32 - 1)
    assert pack(0.5, 1, 0) > pack(0.5, 0, 7)


def test_fill_cycles_through_a_short_class_most_confident_first():
    top = ClassTopK(3, 5)
    for p, o in ((0.9, 0), (0.7, 1)):  # class 0: two images
        top.push(0, p, 0, o)
    for o in range(7):  # class 1: full
        top.push(1, 0.5 + o / 100, 1, o)
    sel = plan_selection(top, "repeat", seed=0)
    assert sel.kept_per_class(3).tolist() == [2, 5, 0]
    assert sel.repeated_per_class(3).tolist() == [3, 0, 0]  # class 2 has nothing to repeat
    copies = Counter(int(sel.ordinal[i]) for i in sel.fill_source)
    assert copies == {0: 2, 1: 1}  # the most confident image is repeated first
    assert plan_selection(top, "short", seed=0).repeated_per_class(3).tolist() == [0, 0, 0]


# ---- the pass ----------------------------------------------------------------------------------------


def test_keeps_the_k_most_confident_above_threshold_per_class(curated, reference):
    out, summary = curated
    want = expected_kept(reference)
    assert any(len(v) == K for v in want.values()) and any(0 < len(v) < K for v in want.values())  # both cases
    kept = defaultdict(set)
    for key, cls, _ in output_samples(out):
        if "_rep" not in key:
            kept[cls].add(ref_of(key))
            assert reference[ref_of(key)][0] == cls and reference[ref_of(key)][1] > THRESHOLD
    assert {c: v for c, v in kept.items()} == {c: set(v) for c, v in want.items()}
    assert summary["kept"] == sum(len(v) for v in want.values())


def test_short_classes_are_filled_to_k_by_repeats_most_confident_first(curated, reference):
    out, summary = curated
    want = expected_kept(reference)
    samples = output_samples(out)
    per_class = Counter(cls for _, cls, _ in samples)
    assert per_class == {c: K for c in want}  # every class with a candidate reaches K; the empty one stays out
    copies = Counter(ref_of(key) for key, _, _ in samples)
    for c, refs in want.items():
        counts = [copies[r] for r in refs]  # most confident first
        assert counts == sorted(counts, reverse=True) and max(counts) - min(counts) <= 1
    by_key = {key: data for key, _, data in samples}
    for key, _, data in samples:  # repeats are byte copies of the kept image
        assert data == by_key[key.split("_rep")[0]]
    manifest = read_manifest(out)
    assert manifest["num_samples"] == len(samples) == K * len(want)
    assert manifest["class_counts"] == {str(c): K for c in sorted(want)}
    assert summary["classes_empty"] == [4] and summary["repeated"] == K * len(want) - summary["kept"]


def test_kept_images_are_the_pool_bytes(curated, world):
    out, _ = curated
    units = pool_units("gen/extra", None, world)
    key, _, data = next(s for s in output_samples(out) if "_rep" not in s[0])
    unit, ordinal = ref_of(key)
    with tarfile.open(units[unit].name) as tar:
        jpgs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    assert data == jpgs[ordinal]


def test_report_counts_match_the_output(curated, reference):
    out, summary = curated
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert len(rows) == NUM_CLASSES
    want = expected_kept(reference)
    for row in rows:
        c = int(row["class"])
        scored = [p for (cc, p) in reference.values() if cc == c]
        candidates = sum(p > THRESHOLD for p in scored)
        assert int(row["scored"]) == len(scored)
        assert int(row["candidates"]) == candidates
        assert int(row["below_threshold"]) == len(scored) - candidates
        assert int(row["kept"]) == len(want.get(c, []))
        assert int(row["dropped_over_cap"]) == candidates - len(want.get(c, []))
        assert int(row["repeated"]) == (K - len(want[c]) if c in want else 0)
        hist = [int(row[k]) for k in row if k.startswith("conf_")]
        assert len(hist) == 10 and sum(hist) == len(scored)
    assert summary["scored"] == len(reference) and summary["candidates"] == sum(len(v) for v in want.values()) + sum(
        int(r["dropped_over_cap"]) for r in rows)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leave_short_writes_only_the_kept(world, reference, tmp_path):
    run(world, str(tmp_path / "short"), "select.fill=short")
    counts = Counter(cls for _, cls, _ in output_samples(tmp_path / "short"))
    assert counts == {c: len(v) for c, v in expected_kept(reference).items()}


def test_resume_does_not_rescore_finished_shards(world, reference, tmp_path, curated):
    out = tmp_path / "resumed"
    # 20 images a shard in batches of 8: 3 calls a shard; stop in the middle of the third shard
    first = ColourScorer(fail_after_calls=7)
    with pytest.raises(KeyboardInterrupt):
        run(world, str(out), scorer=first)
    saved = CurationProgress.load(next((out / ".progress").glob("score-rank*.pt")))
    assert saved.done == {0, 1} and saved.stats.scored == 40  # the partly scored shard is not in it
    stopped = ColourScorer(signal_at_call=2)  # SIGTERM in the middle of a shard: that shard is finished first
    with pytest.raises(SystemExit) as exit_status:
        run(world, str(out), scorer=stopped)
    assert exit_status.value.code == EXIT_REQUEUE and stopped.images == 20
    assert CurationProgress.load(next((out / ".progress").glob("score-rank*.pt"))).stats.scored == 60
    second = ColourScorer()
    summary = run(world, str(out), scorer=second)
    assert second.images == len(reference) - 60  # finished shards were not scored again
    assert summary["resumed"] and summary["scored"] == len(reference)
    assert sorted(k for k, _, _ in output_samples(out)) == sorted(k for k, _, _ in output_samples(curated[0]))


def test_heaps_never_exceed_k_during_a_run(world, tmp_path, monkeypatch):
    sizes = []
    push = ClassTopK.push

    def watched(self, *args):
        push(self, *args)
        sizes.append(len(self.heaps[args[0]]))

    monkeypatch.setattr(ClassTopK, "push", watched)
    run(world, str(tmp_path / "bounded"), "select.per_class=3")
    assert sizes and max(sizes) == 3


def test_processes_split_units_and_merge_to_the_single_process_result(world, curated):
    units = pool_units("gen/extra", None, world)

    accelerator = Accelerator(cpu=True)
    parts = []
    for rank in range(2):
        progress = CurationProgress("x", ClassTopK(NUM_CLASSES, K), ScoreStats(NUM_CLASSES, 10), THRESHOLD)
        score_units(rank_share(units, rank, 2), EvalRender(IMG, 0.875, 8), ColourScorer(), progress, accelerator,
                    world / f"rank{rank}.pt", 100, 0)
        parts.append(progress)
    assert parts[0].done.isdisjoint(parts[1].done) and len(parts[0].done | parts[1].done) == len(units)
    top, stats, _ = merged(parts)
    single = CurationProgress.load(next((curated[0] / ".progress").glob("score-rank*.pt")))
    assert all(top.ranked(c) == single.top.ranked(c) for c in range(NUM_CLASSES))
    assert (stats.hist == single.stats.hist).all() and stats.scored == single.stats.scored


def test_image_folder_pool(world, tmp_path):
    folder = tmp_path / "pool" / "nested"
    folder.mkdir(parents=True)
    with tarfile.open(pool_units("gen/extra", None, world)[0].name) as tar:
        jpgs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    for i, data in enumerate(jpgs):  # PNG files: written out re-encoded as JPEG
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        cv2.imwrite(str(folder / f"img.{i:03d}.png"), image)
    summary = run(world, str(tmp_path / "from_folder"), f"pool.folder={tmp_path / 'pool'}", "pool.shards=null",
                  "pool.folder_chunk=6")
    assert summary["scored"] == len(jpgs)
    samples = output_samples(tmp_path / "from_folder")
    assert samples and all(data[:2] == b"\xff\xd8" for _, _, data in samples)


def test_configuration_mistakes_are_named(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(world, str(tmp_path / "x"), "select.fill=sometimes")
    assert e.value.code == 2 and "select.fill" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(world, str(tmp_path / "x"), "pool.folder=somewhere")
    assert "exactly one of pool.shards" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(world, str(tmp_path / "x"), "select.per_clas=3")
    assert "per_class" in capsys.readouterr().err  # the valid keys are listed


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_what_one_process_writes(world, tmp_path):
    """A real two-process launch (gloo on the CPU) against the same run in one process: same selection."""
    import os
    import subprocess
    import sys

    from distill.engine.checkpoint import atomic_save
    from distill.models.factory import create_model, input_spec
    from distill.models.teacher import InputAdapter

    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=4).eval()
    with torch.no_grad():  # centre the head on this pool so that every class wins some images
        x = torch.cat([b["image"] for u in pool_units("gen/extra", None, world) for b in EvalRender(IMG, 0.875, 64)(u)])
        model.fc.bias -= model(InputAdapter(input_spec(model))(x.float() / 255)).mean(0)
    atomic_save({"model": model.state_dict()}, tmp_path / "scorer.pt")
    args = [f"recipe={world / 'base.yaml'}", f"scorer.checkpoint={tmp_path / 'scorer.pt'}", "scorer.name=test_resnet",
            "scorer.num_classes=4", "select.threshold=0.0", "select.per_class=25", "num_workers=1"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, curate.__file__, *args, f"output_dir={tmp_path / 'two'}"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two" / ".progress").glob("score-*")) == [
        "score-rank000-of-002.pt", "score-rank001-of-002.pt"]
    single = curate.main([*args, f"output_dir={tmp_path / 'one'}"])
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert single["repeated"] > 0 and single["kept"] > 0  # both kept images and fill copies are written
    assert {k: v for k, v in two.items() if k != "shards"} == {k: v for k, v in single.items() if k != "shards"}
    assert Counter(k for k, _, _ in output_samples(tmp_path / "two")) == Counter(
        k for k, _, _ in output_samples(tmp_path / "one"))


# ---- the write pass: resumable part-way, bounded per process ---------------------------------------------


def test_an_interrupted_write_resumes_after_its_complete_shards(world, curated, tmp_path, monkeypatch):
    from distill.passes import curation_writer
    from distill.passes import units as units_module

    out = tmp_path / "write_resumed"
    commit, commits = curation_writer.PartWriter._commit, []

    def failing_commit(self):
        if len(commits) == 2:  # two kept shards are in place when the third fails
            raise KeyboardInterrupt("interrupted by the test")
        commits.append(self.prefix)
        commit(self)

    monkeypatch.setattr(curation_writer.PartWriter, "_commit", failing_commit)
    with pytest.raises(KeyboardInterrupt):
        run(world, str(out))
    assert commits == ["kept-r000", "kept-r000"] and not (out / "manifest.json").exists()
    monkeypatch.setattr(curation_writer.PartWriter, "_commit", commit)

    read = []
    iter_unit = units_module.iter_unit
    monkeypatch.setattr(curation_writer, "iter_unit", lambda unit: read.append(unit.index) or iter_unit(unit))
    scorer = ColourScorer()
    summary = run(world, str(out), scorer=scorer)
    assert scorer.images == 0  # scoring was finished: nothing scored again
    units_with_picks = {ref_of(k)[0] for k, _, _ in output_samples(out) if "_rep" not in k}
    assert 0 < len(read) < len(units_with_picks)  # units whose images were all in the first two shards: not read
    assert sorted(output_samples(out)) == sorted(output_samples(curated[0]))  # the same output, byte for byte
    assert summary["written"] == curated[1]["written"]


def _pool(folder: Path, units: int, per_unit: int) -> list:
    from distill.data.shards import write_shards

    image = np.zeros((8, 8, 3), np.uint8)
    for u in range(units):
        write_shards(((f"s{u}_{i}", image, 0) for i in range(per_unit)), folder, prefix=f"p{u:03d}", maxcount=per_unit)
    return pool_units(str(folder), None, folder)


def _write_pass_peak(tmp_path: Path, units: int, per_unit: int = 50) -> int:
    """Peak Python memory of one process's write pass for a selection of every pool image, each repeated once."""
    import tracemalloc

    from distill.passes.curation_writer import write_fill, write_kept, write_plan
    from distill.passes.selection import Selection

    pool = _pool(tmp_path / "pool", units, per_unit)
    n = units * per_unit
    unit, ordinal = np.repeat(np.arange(units), per_unit), np.tile(np.arange(per_unit), units)
    sel = Selection(2, "repeat", np.zeros(n, np.int64), np.ones(n, np.float32), unit, ordinal,
                    np.random.default_rng(0).permutation(n), np.ones(n, np.int64))
    write_plan(sel, 1, tmp_path / "plan", "x")
    tracemalloc.start()
    write_kept(tmp_path / "plan", pool, 0, tmp_path / "parts", 40, 95)
    write_fill(tmp_path / "plan", 0, 1, tmp_path / "parts", 40)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    written = sorted((tmp_path / "parts").glob("*/*.tar"))
    assert sum(len(tarfile.open(p).getnames()) for p in written) == 2 * 2 * n  # jpg + cls, kept + fill
    return peak


def test_the_write_pass_memory_does_not_grow_with_the_selection(tmp_path):
    small = _write_pass_peak(tmp_path / "small", units=8)  # 400 images: more than a block of fill copies
    large = _write_pass_peak(tmp_path / "large", units=40)  # 5x the selection and the fill
    # a per-process index of the whole selection (~90 B an image) and of every kept image (~190 B) would
    # add ~450 KB here; streaming from the plan keeps the peak at one unit's picks and one block of copies
    assert large < 1.3 * small + 20_000, (small, large)
