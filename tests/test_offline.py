"""Offline teacher labels: one labelling pass over generated data, checked against the teacher, replayed,
resumed, and used to train two different students with no teacher in the loop."""
from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from launches import finish, run, torchrun

from distill import label_views
from distill.data.loader import build_train_loader
from distill.data.mix import DataMix
from distill.data.shards import decode_sample
from distill.data.synthetic import generate_classification
from distill.engine.preemption import EXIT_REQUEUE
from distill.models.teacher import create_teacher
from distill.passes.offline_mix import offline_mix
from distill.passes.soft_labels import decode_record
from distill.passes.views import ViewRender, ViewUnit

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = str(ROOT / "distill" / "pretrain.py")
NUM_CLASSES, TOPK, REPLICAS, IMG = 6, 4, 2, 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    generate_classification(root / "shapes", num_classes=NUM_CLASSES, train_per_class=120, val_per_class=40,
                            img_size=IMG, seed=0, shard_size=60)
    (root / "mix.yaml").write_text(
        "sources:\n"
        "  strong: {shards: shapes/train, augment: {name: inception_randaug, num_ops: 2, magnitude: 9}, weight: 1}\n"
        "  mixed: {shards: shapes/train, augment: {name: inception}, mixup: true, weight: 1}\n"
        "schedule:\n"
        "  - {at: 0.0, weights: {strong: 3, mixed: 1}}\n"
        "  - {at: 1.0, weights: {strong: 1, mixed: 1}}\n"
    )
    (root / "label.yaml").write_text(f"""
mix: {root / 'mix.yaml'}
data_root: {root}
teacher: {{name: test_resnet, pretrained: false, num_classes: {NUM_CLASSES}, fit_steps: 250, fit_lr: 0.003,
           fit_mix: {root / 'mix.yaml'}, fit_img_size: {IMG}, fit_batch_size: 32}}
view: {{img_size: {IMG}, replicas: {REPLICAS}, quality: 90, targets: topk, topk: {TOPK}, meta: true}}
batch_size: 64
num_workers: 1
precision: "no"
""")
    return root


@pytest.fixture(scope="module")
def labelled(world):
    """The one labelling pass every test here reads (it also trains the teacher: teacher.pt)."""
    summary = label_views.main([f"recipe={world / 'label.yaml'}", "output_dir=views"])
    return world / "views", summary


def stored_views(folder: Path) -> list[dict]:
    views = defaultdict(dict)
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                views[(shard.name, key)][ext] = tar.extractfile(m).read()
                views[(shard.name, key)]["__key__"] = key
                views[(shard.name, key)]["__url__"] = str(shard)
    return list(views.values())


def load_teacher(out: Path):
    return create_teacher("test_resnet", False, str(out / "teacher.pt"), NUM_CLASSES).eval()


def test_every_view_is_written_with_a_manifest_and_a_mix(labelled, world):
    out, summary = labelled
    for source in ("strong", "mixed"):
        manifest = json.loads((out / source / "manifest.json").read_text())
        assert manifest["num_samples"] == NUM_CLASSES * 120 * REPLICAS == summary["sources"][source]["views"]
        assert manifest["class_counts"] == {str(c): 120 * REPLICAS for c in range(NUM_CLASSES)}
        assert len(manifest["shards"]) == 12 * REPLICAS  # one shard per (source shard, replica)
        assert manifest["offline_labels"]["view"]["topk"] == TOPK
        assert manifest["images"] == NUM_CLASSES * 120 and manifest["replicas"] == REPLICAS  # an epoch's images
    mix = DataMix.load(out / "mix.yaml", world)
    assert mix.source_names == ["strong", "mixed"] and mix.mixup_flags == [False, False]
    assert all(s.augment == {"name": "flip"} for s in mix.sources)
    original = DataMix.load(world / "mix.yaml", world)
    for p in (0.0, 0.4, 1.0):
        assert np.allclose(mix.weights_at(p), original.weights_at(p))
    assert mix.num_samples("strong") == NUM_CLASSES * 120 * REPLICAS


def test_stored_distribution_is_the_teachers_on_the_decoded_view(labelled):
    out, _ = labelled
    teacher = load_teacher(out)
    for source in ("strong", "mixed"):
        views = stored_views(out / source)[::37]
        images = torch.stack([torch.from_numpy(decode_sample(v)[0]).permute(2, 0, 1) for v in views])
        with torch.no_grad():
            probs = teacher(images.float() / 255).softmax(-1)
        for view, p in zip(views, probs):
            raw = np.load(io.BytesIO(view["soft.npy"]))
            assert raw["idx"].dtype == np.int16 and raw["prob"].dtype == np.float16 and raw["idx"].shape == (TOPK,)
            idx, prob = raw["idx"], raw["prob"]
            # what was stored is the teacher's distribution on exactly these pixels, to float16 precision
            np.testing.assert_allclose(prob.astype(np.float32), p[idx.astype(np.int64)].numpy(), rtol=2e-3, atol=2e-4)
            assert (np.diff(prob.astype(np.float32)) <= 0).all()  # most probable first
            assert prob.astype(np.float32).min() >= np.sort(p.numpy())[-TOPK] - 1e-3  # the top k, not any k


def test_views_replay_byte_for_byte_and_mixup_is_stored(labelled, world):
    out, _ = labelled
    mix = DataMix.load(world / "mix.yaml", world)
    render = ViewRender({s.name: s.augment for s in mix.sources}, {s.name: s.mixup for s in mix.sources},
                        IMG, 90, 64, 0)
    for source in ("strong", "mixed"):
        unit = ViewUnit(0, source, mix.shard_paths(source)[3], 3, 1)
        stored = {v["__key__"]: v for v in stored_views(out / source) if v["__url__"].endswith(unit.file_name)}
        replayed = [b for b in render(unit)]
        keys = [k for b in replayed for k in b["key"]]
        assert len(keys) == len(stored) == 60
        jpgs = [j for b in replayed for j in b["jpg"]]
        assert all(stored[f"{k}_r1"]["jpg"] == j for k, j in zip(keys, jpgs))
        metas = [json.loads(stored[f"{k}_r1"]["json"]) for k in keys]
        lams = np.array([m["lam"] for m in metas])
        if source == "mixed":
            assert lams.min() < 0.2 and lams.max() > 0.8  # extreme mixup: weights spread over [0, 1]
            assert all(m["partner"] != m["src"] for m in metas)
        else:
            assert (lams == 1).all() and all(m["partner"] == m["src"] for m in metas)
    # another replica of the same shard is another view
    a = next(iter(render(ViewUnit(0, "strong", mix.shard_paths("strong")[3], 3, 0))))["image"]
    b = next(iter(render(ViewUnit(0, "strong", mix.shard_paths("strong")[3], 3, 1))))["image"]
    assert (a != b).any()


def test_the_training_stream_carries_the_stored_labels(labelled, world):
    out, _ = labelled
    mix = DataMix.load(out / "mix.yaml", world)
    loader = build_train_loader(mix, IMG, 16, 0, seed=0, total_samples=64, soft_labels=True, with_keys=True)
    batch = next(iter(loader))
    assert batch["soft_idx"].shape == (16, TOPK) and batch["soft_idx"].dtype == torch.int64
    assert batch["soft_prob"].shape == (16, TOPK) and batch["soft_prob"].dtype == torch.float32
    stored = {(s, v["__key__"]): (np.load(io.BytesIO(v["soft.npy"])), json.loads(v["json"]))
              for s in mix.source_names for v in stored_views(out / s)}
    for i, (source, key) in enumerate(zip(batch["source"], batch["key"])):
        record, meta = stored[(mix.source_names[source], key)]
        assert (batch["soft_idx"][i].numpy() == record["idx"]).all()
        assert (batch["soft_prob"][i].numpy() == record["prob"].astype(np.float32)).all()
        # the view's mixup travels with it: a label term on a stored mixed view uses both labels
        assert int(batch["partner_label"][i]) == meta["partner_label"]
        assert float(batch["lam"][i]) == pytest.approx(meta["lam"], abs=1e-6)


def test_shards_without_stored_labels_are_refused_by_name(world):
    loader = build_train_loader(DataMix.load(world / "mix.yaml", world), IMG, 4, 0, seed=0, total_samples=8,
                                soft_labels=True)
    with pytest.raises(RuntimeError, match="consecutive samples"):
        next(iter(loader))


def test_full_distribution_is_stored_in_float16_with_the_mixup_and_its_bytes(labelled, world):
    out, _ = labelled
    teacher = load_teacher(out)
    summary = label_views.main([f"recipe={world / 'label.yaml'}", "output_dir=full", "sources=[mixed]",
                                "view.replicas=1", "view.targets=full"], teacher=teacher)
    views = stored_views(world / "full" / "mixed")
    assert len(views) == NUM_CLASSES * 120 and summary["sources"]["mixed"]["bytes_per_view"] > 0
    images = torch.stack([torch.from_numpy(decode_sample(v)[0]).permute(2, 0, 1) for v in views[::29]])
    with torch.no_grad():
        probs = teacher(images.float() / 255).softmax(-1)
    for view, p in zip(views[::29], probs):
        raw = np.load(io.BytesIO(view["soft.npy"]))
        assert raw["prob"].dtype == np.float16 and raw["prob"].shape == (NUM_CLASSES,)  # every class, as the paper
        np.testing.assert_allclose(raw["prob"].astype(np.float32), p.numpy(), rtol=2e-3, atol=2e-4)
        meta = json.loads(view["json"])
        assert int(raw["partner"]) == meta["partner_label"] and float(raw["lam"]) == pytest.approx(meta["lam"], abs=1e-6)
    # bytes per view are reported from what was written (the plan's record size is the one written)
    from distill.passes.soft_labels import record_bytes

    assert len(views[0]["soft.npy"]) == record_bytes("full", NUM_CLASSES)
    manifest = json.loads((world / "full" / "mixed" / "manifest.json").read_text())
    assert summary["sources"]["mixed"]["bytes_per_view"] == pytest.approx(manifest["bytes"] / len(views), abs=0.1)


def test_offline_targets_and_mixup_partners_reach_the_loss(labelled, world):
    """Stored D2 views train a label term on both labels; stored top-k mass is spread, not dropped."""
    from distill.losses import distillation_loss, stored_targets

    out, _ = labelled
    mix = DataMix.load(out / "mix.yaml", world)
    loader = build_train_loader(mix, IMG, 32, 0, seed=1, total_samples=64, soft_labels=True)
    batch = next(iter(loader))
    targets, partner_labels, lam = stored_targets(batch, NUM_CLASSES, 1.0, "cpu")
    mixed = batch["source"] == mix.source_names.index("mixed")
    assert mixed.any() and (lam[mixed] < 1).all() and (lam[~mixed] == 1).all()
    assert (partner_labels[~mixed] == batch["label"][~mixed]).all()
    assert torch.allclose(targets.sum(1), torch.ones(32)) and (targets > 0).all()  # nothing is impossible
    kept = torch.gather(targets, 1, batch["soft_idx"])
    assert torch.allclose(kept, batch["soft_prob"] / batch["soft_prob"].sum(1, keepdim=True).clamp_min(1), atol=1e-3)
    logits = torch.randn(32, NUM_CLASSES)
    ce = distillation_loss(logits, targets, batch["label"], partner_labels, lam, kd_weight=0.0, ce_weight=1.0)["ce"]
    per = lambda y: torch.nn.functional.cross_entropy(logits, y, reduction="none")  # noqa: E731
    assert torch.allclose(ce, (lam * per(batch["label"]) + (1 - lam) * per(batch["partner_label"])).mean())


def test_views_at_another_side_than_the_student_are_refused(labelled, world):
    from distill.config import ConfigError
    from distill.plan import check_stored_views

    out, _ = labelled
    mix = DataMix.load(out / "mix.yaml", world)
    check_stored_views(mix, IMG)
    with pytest.raises(ConfigError, match=f"strong are {IMG} px.*data.img_size={2 * IMG}"):
        check_stored_views(mix, 2 * IMG)


class CountingTeacher:
    """Counts the images it labels; raises at a call after `fail_after_calls` (a crash), or sends this process
    SIGTERM at call `signal_at_call` (a scheduler's stop)."""

    def __init__(self, teacher, fail_after_calls=None, signal_at_call=None):
        self.teacher, self.fail_after_calls, self.signal_at_call = teacher, fail_after_calls, signal_at_call
        self.calls = self.images = 0

    def __call__(self, x):
        self.calls += 1
        if self.fail_after_calls is not None and self.calls > self.fail_after_calls:
            raise KeyboardInterrupt("interrupted by the test")
        if self.calls == self.signal_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        self.images += len(x)
        return self.teacher(x)


def test_interrupted_labelling_resumes_without_relabelling(labelled, world):
    out, _ = labelled
    teacher = load_teacher(out)
    args = [f"recipe={world / 'label.yaml'}", "output_dir=resumed", "sources=[strong]", "view.replicas=1",
            "num_workers=0", "batch_size=20"]  # 3 teacher calls per shard of 60
    first = CountingTeacher(teacher, fail_after_calls=7)
    with pytest.raises(KeyboardInterrupt):
        label_views.main(args, teacher=first)
    assert len(list((world / "resumed" / "strong").glob("*.tar"))) == 2  # the unit in flight left no file
    stopped = CountingTeacher(teacher, signal_at_call=2)  # SIGTERM in the first unit of this launch: it is finished
    with pytest.raises(SystemExit) as exit_status:
        label_views.main(args, teacher=stopped)
    assert exit_status.value.code == EXIT_REQUEUE and stopped.images == 60
    assert len(list((world / "resumed" / "strong").glob("*.tar"))) == 3
    second = CountingTeacher(teacher)
    summary = label_views.main(args, teacher=second)
    assert second.images == (12 - 3) * 60  # only the units not finished before
    assert summary["sources"]["strong"]["views"] == 720
    more = CountingTeacher(teacher)
    label_views.main(args[:-3] + ["view.replicas=2", "num_workers=0", "batch_size=20"], teacher=more)
    assert more.images == 720  # raising the replica count labels the new replica only


def test_two_processes_write_the_views_one_process_wrote(labelled, world, tmp_path):
    """A real two-process launch (gloo on the CPU): units are split, and every view is the one a single
    process writes (same pixels, same labels)."""
    out, _ = labelled
    finish(torchrun(label_views.__file__, 2, tmp_path / "two", f"recipe={world / 'label.yaml'}", "sources=[mixed]",
                    "view.replicas=1", f"teacher.checkpoint={out / 'teacher.pt'}"), tmp_path / "two")
    records = [json.loads(line) for p in sorted((tmp_path / "two" / ".progress").glob("label-rank*.jsonl"))
               for line in p.read_text().splitlines()]
    assert {r["unit"].split("/")[0] for r in records} == {"mixed"} and len(records) == 12
    assert len({r["unit"] for r in records}) == 12  # each unit once, over both processes
    one = {v["__key__"]: v for v in stored_views(out / "mixed") if v["__key__"].endswith("_r0")}
    two = stored_views(tmp_path / "two" / "mixed")
    assert len(two) == len(one) == 720
    for v in two:
        assert v["jpg"] == one[v["__key__"]]["jpg"]
        p1, p2 = decode_record(v["soft.npy"], 0)["soft_prob"], decode_record(one[v["__key__"]]["soft.npy"], 0)["soft_prob"]
        np.testing.assert_allclose(p1, p2, atol=2e-3)


def test_changed_settings_are_refused(labelled, world, capsys):
    with pytest.raises(SystemExit) as e:
        label_views.main([f"recipe={world / 'label.yaml'}", "output_dir=views", "view.quality=50"])
    assert e.value.code == 2 and "other settings" in capsys.readouterr().err


def test_demo_offline_mix_is_the_label_demo_output():
    demo = DataMix.load("demo", "data")
    written = offline_mix(demo, demo.source_names, Path("data") / "demo_offline", Path("data"))
    shipped = yaml.safe_load((ROOT / "data_mixes" / "demo_offline.yaml").read_text())
    assert shipped["sources"] == written["sources"] and shipped["schedule"] == written["schedule"]
    recipe = yaml.safe_load((ROOT / "recipes" / "label_demo.yaml").read_text())
    assert recipe["output_dir"] == "demo_offline" and recipe["mix"] == "demo"
    mnv4 = DataMix.load("mnv4", "/data")
    written = offline_mix(mnv4, mnv4.source_names, Path("/data") / "mnv4_offline", Path("/data"))
    assert yaml.safe_load((ROOT / "data_mixes" / "mnv4_offline.yaml").read_text())["sources"] == written["sources"]


# ---- training students on the stored labels ------------------------------------------------------------


def pretrain(world, out: Path, *args: str) -> dict:
    recipe = world / "train.yaml"
    recipe.write_text(f"""
student: {{num_classes: {NUM_CLASSES}}}
data: {{root: {world}, img_size: {IMG}, batch_size: 16, num_workers: 1, val_shards: shapes/val, val_batch_size: 120}}
optim: {{lr: 0.003, weight_decay: 0.01, warmup_steps: 5, clip_grad: 5.0}}
train: {{ema_decay: 0.9, log_every: 20, ckpt_every: 1000, trackers: [jsonl]}}
""")
    proc = run(PRETRAIN, f"recipe={recipe}", f"output_dir={out}", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


STEPS = "train.steps=150"


@pytest.fixture(scope="module")
def offline_runs(labelled, world, tmp_path_factory):
    """Two different students from the one labelling pass; the teacher named here does not even exist."""
    out, _ = labelled
    runs = {}
    for student in ("test_resnet", "test_efficientnet"):
        runs[student] = pretrain(world, tmp_path_factory.mktemp(student), STEPS, f"student.name={student}",
                                 "teacher.mode=offline", f"data.mix={out / 'mix.yaml'}",
                                 "teacher.name=no_such_model", "teacher.pretrained=false", "teacher.fit_steps=0")
    return runs


@pytest.mark.slow
def test_one_labelling_pass_trains_two_students(offline_runs):
    chance = 100 / NUM_CLASSES
    for student, s in offline_runs.items():
        assert s["steps"] == 150 and s["teacher_top1"] is None  # no teacher ran
        assert set(s["source_counts"]) == {"strong", "mixed"} and sum(s["source_counts"].values()) == 150 * 16
        assert max(s["student_top1"], s["student_ema_top1"]) > 2 * chance, (student, s)


@pytest.mark.slow
def test_offline_training_lands_in_the_online_accuracy_band(offline_runs, labelled, world, tmp_path):
    out, _ = labelled
    online = pretrain(world, tmp_path / "online", STEPS, "student.name=test_resnet", "teacher.mode=online",
                      f"data.mix={world / 'mix.yaml'}", "teacher.name=test_resnet",
                      f"teacher.checkpoint={out / 'teacher.pt'}", "teacher.pretrained=false")
    offline = offline_runs["test_resnet"]
    best = lambda s: max(s["student_top1"], s["student_ema_top1"])  # noqa: E731
    assert online["teacher_top1"] > 2 * 100 / NUM_CLASSES  # the teacher learned something worth distilling
    # same teacher, student, steps and batch: within 15 points of each other (240 val images; small budgets vary)
    assert abs(best(offline) - best(online)) <= 15, (offline, online)


def test_more_processes_than_units_finish_and_label_every_view_once(labelled, world, tmp_path):
    """Three processes, two shards to label: one process has nothing to do and must not hold the others up."""
    out, _ = labelled
    (tmp_path / "two_shards.yaml").write_text(
        "sources:\n  mixed: {shards: 'shapes/train/shard-{000000..000001}.tar', augment: {name: inception}, "
        "mixup: true}\n")
    finish(torchrun(label_views.__file__, 3, tmp_path / "three", f"recipe={world / 'label.yaml'}",
                    f"mix={tmp_path / 'two_shards.yaml'}", "view.replicas=1", f"teacher.checkpoint={out / 'teacher.pt'}"),
           tmp_path / "three")
    keys = [v["__key__"] for v in stored_views(tmp_path / "three" / "mixed")]
    assert len(keys) == len(set(keys)) == 120
