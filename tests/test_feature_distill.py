"""Feature distillation: the losses and projection heads, maps read from a classifier's forward (ViT tokens laid
out on the patch grid), sources without classes, the dry-run plan, the errors a recipe can meet, and one short
run of the demo whose feature loss falls and whose export carries no projection head."""
from __future__ import annotations

import json
import math
import os
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import webdataset as wds
from torch import nn

import launches
from distill.config import ConfigError, load_pretrain_config
from distill.data.labels import check_labels
from distill.data.mix import DataMix, MixError
from distill.data.shards import UNLABELLED, encode_jpeg, write_shards
from distill.data.stream import MixedStream
from distill.feature_losses import feature_loss, resize_to, standardise
from distill.feature_objective import FeatureObjective
from distill.models.factory import create_model
from distill.models.feature_taps import FeatureTaps, feature_points, points_at_strides, tokens_to_map
from distill.models.projection import HEADS, ProjectionHeads, without_projection_heads
from distill.models.teacher import create_teacher
from distill.plan import plan_run

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = str(ROOT / "distill" / "pretrain.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def pixel(values) -> torch.Tensor:
    """A (1, C, 1, 1) map: one location with these channel values."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


# ---- losses -----------------------------------------------------------------------------------------------


def test_losses_on_a_hand_made_location():
    # teacher [0, 1] standardises to [-1, 1]; the student's [1, 0] is compared with that
    student, teacher = pixel([1.0, 0.0]), pixel([0.0, 1.0])
    assert standardise(teacher).flatten().tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)
    assert feature_loss([student], [teacher], [0], "cosine").item() == pytest.approx(1 + 1 / math.sqrt(2), rel=1e-5)
    assert feature_loss([student], [teacher], [0], "mse").item() == pytest.approx((4 + 1) / 2, rel=1e-5)
    # Huber, beta 1: |2| -> 1.5, |1| -> 0.5
    assert feature_loss([student], [teacher], [0], "smooth_l1").item() == pytest.approx((1.5 + 0.5) / 2, rel=1e-5)


def test_cosine_ignores_the_student_scale_and_the_others_do_not():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    for kind, same in (("cosine", True), ("mse", False), ("smooth_l1", False)):
        a = feature_loss([student], [teacher], [0], kind)
        b = feature_loss([3 * student], [teacher], [0], kind)
        assert torch.isclose(a, b, rtol=1e-5).item() is same, kind
    # a student equal to the standardised teacher scores zero everywhere
    for kind in ("cosine", "mse", "smooth_l1"):
        assert feature_loss([standardise(teacher)], [teacher], [0], kind).item() == pytest.approx(0, abs=1e-5)


def test_maps_meet_on_the_teacher_grid_or_the_given_one():
    coarse, fine = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 8, 8)
    assert resize_to(fine, (4, 4)).shape == (2, 4, 4, 4)
    assert resize_to(coarse, (2, 2)) is coarse  # already there: untouched
    constant = torch.full((1, 4, 8, 8), 0.7)
    assert torch.allclose(resize_to(constant, (3, 3)), constant[..., :3, :3])  # bilinear keeps a constant
    # a student at stride 8 (8x8) and one at 32 (2x2) against one 4x4 teacher map: both are compared on 4x4
    teacher = torch.randn(2, 4, 4, 4)
    up = resize_to(coarse, (4, 4))
    expected = (feature_loss([up], [teacher], [0]) + feature_loss([resize_to(fine, (4, 4))], [teacher], [0])) / 2
    assert feature_loss([fine, coarse], [teacher], [0, 0]).item() == pytest.approx(expected.item(), rel=1e-5)
    # with a grid, the teacher is resized too
    got = feature_loss([coarse], [teacher], [0], grid=2)
    assert got.item() == pytest.approx(feature_loss([coarse], [resize_to(teacher, (2, 2))], [0]).item(), rel=1e-5)


def test_projection_heads_map_student_channels_to_the_teacher_and_leave_exports():
    heads = ProjectionHeads([16, 24], [64, 64])
    out = heads([torch.randn(2, 16, 8, 8), torch.randn(2, 24, 4, 4)])
    assert [tuple(o.shape) for o in out] == [(2, 64, 8, 8), (2, 64, 4, 4)]
    state = {"blocks.0.weight": torch.zeros(1), f"{HEADS}.heads.0.0.weight": torch.zeros(1)}
    assert list(without_projection_heads(state)) == ["blocks.0.weight"]


# ---- maps from a classifier's forward ---------------------------------------------------------------------


def test_vit_tokens_land_on_the_patch_grid_row_by_row():
    # 1 prefix token, then patch k carries the value k in every channel, on a 2 x 3 grid (not square: a
    # transposed layout would show)
    tokens = torch.cat([torch.full((1, 1, 4), -1.0), torch.arange(6.0).view(1, 6, 1).expand(1, 6, 4)], dim=1)
    grid = tokens_to_map(tokens, num_prefix=1, grid=(2, 3))
    assert grid.shape == (1, 4, 2, 3)
    assert grid[0, 0].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    with pytest.raises(ValueError):
        tokens_to_map(tokens, num_prefix=0, grid=(2, 3))


def test_vit_taps_match_timm_forward_intermediates():
    torch.manual_seed(0)
    model = create_model("test_vit", num_classes=5, img_size=64).eval()  # 16 px patches: a 4x4 grid
    taps = FeatureTaps(model, [feature_points(model, "test_vit")[i] for i in (1, -1)])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), taps.capturing() as maps:
        logits = model(x)
        reference = model.forward_intermediates(x, indices=[1, len(model.blocks) - 1], norm=True,
                                                intermediates_only=True)
    assert logits.shape == (2, 5) and [tuple(m.shape) for m in maps] == [(2, 64, 4, 4)] * 2
    for got, want in zip(maps, reference):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        model(x)
    assert taps.maps == [None, None]  # outside `capturing()` nothing is kept


def test_student_taps_are_features_only_maps():
    torch.manual_seed(0)
    student = create_model("mobilenetv4_conv_small_035", num_classes=10).eval()
    points = points_at_strides(feature_points(student, "s"), [8, 16, 32], "s", "feature.strides")
    taps = FeatureTaps(student, points)
    features = timm.create_model("mobilenetv4_conv_small_035", features_only=True, out_indices=(2, 3, 4)).eval()
    missing, _ = features.load_state_dict(student.state_dict(), strict=False)
    assert not missing
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), taps.capturing() as maps:
        student(x)
        expected = features(x)
    assert taps.strides == [8, 16, 32] and taps.channels == features.feature_info.channels()
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want)
    # a deep copy (the EMA's) has taps of its own: its forwards never write into the original's maps
    copy = deepcopy(student)
    with torch.no_grad(), taps.capturing() as maps:
        copy(x)
    assert maps == [None, None, None]


def feature_cfg(*overrides):
    return load_pretrain_config(["recipe=demo_feature", "student.name=mobilenetv4_conv_small_035",
                                 "teacher.name=test_convnext", *overrides])


def test_one_training_step_moves_the_heads_and_the_student():
    torch.manual_seed(0)
    cfg = feature_cfg("teacher.features=[-1]", "feature.grid=2")
    teacher = create_teacher("test_convnext", False, None, 10)
    student = create_model(cfg.student.name, num_classes=10)
    objective = FeatureObjective(cfg, student, teacher)
    assert hasattr(student, HEADS) and objective.pairs == [0, 0, 0]
    images = torch.rand(4, 3, 64, 64)
    _, teacher_maps = objective.teacher_forward(images)
    logits, student_maps = objective.student_forward(student, images)
    terms = objective.add_term({"loss": 0.0}, logits, student_maps, teacher_maps)
    assert set(terms) == {"loss", "feature"} and terms["loss"].item() == pytest.approx(terms["feature"].item())
    terms["loss"].backward()
    head_grad = student.feature_heads.heads[0][0].weight.grad
    assert head_grad is not None and head_grad.abs().sum() > 0
    assert student.get_classifier().weight.grad is not None  # the zero-weight logit term reaches the classifier
    assert all(p.grad is None for p in teacher.parameters())
    # beside a logit term the feature term is added at its weight, with no zero-weight extra
    cfg = feature_cfg("teacher.features=[-1]", "loss.kd_weight=1", "loss.feature_weight=0.5")
    objective = FeatureObjective(cfg, create_model(cfg.student.name, num_classes=10), teacher)
    both = objective.add_term({"loss": torch.tensor(2.0), "kd": torch.tensor(2.0)}, logits, student_maps, teacher_maps)
    assert both["loss"].item() == pytest.approx(2.0 + 0.5 * both["feature"].item())


def test_a_vit_teacher_teaches_its_patch_grid_at_the_view_side():
    cfg = feature_cfg("teacher.name=test_vit", "teacher.features=[-1]")
    teacher = create_teacher("test_vit", False, None, 10, view_size=64)  # a fixed-side ViT built for 64 px views
    student = create_model(cfg.student.name, num_classes=10)
    objective = FeatureObjective(cfg, student, teacher)
    logits, maps = objective.teacher_forward(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 10) and [tuple(m.shape) for m in maps] == [(2, 64, 4, 4)]
    assert not maps[0].is_inference()  # usable in the student's loss
    student_logits, student_maps = objective.student_forward(student, torch.rand(2, 3, 64, 64))
    loss = objective.add_term({"loss": 0.0}, student_logits, student_maps, maps)["loss"]
    assert torch.isfinite(loss) and loss.requires_grad


def test_torchvision_students_have_their_stage_strides_measured():
    student = create_model("torchvision/shufflenet_v2_x0_5", num_classes=10)
    points = feature_points(student, "shufflenet")
    assert [(p.module, p.stride) for p in points][-3:] == [("stage2", 8), ("stage3", 16), ("stage4", 32)]
    taps = FeatureTaps(student, points_at_strides(points, [8, 16, 32], "s", "feature.strides"))
    with torch.no_grad(), taps.capturing() as maps:
        student.eval()(torch.zeros(1, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(48, 8, 8), (96, 4, 4), (192, 2, 2)]


# ---- errors, one line each --------------------------------------------------------------------------------


def test_a_teacher_without_feature_maps_is_refused():
    cfg = feature_cfg()
    plain = SimpleNamespace(model=nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    with pytest.raises(ConfigError, match="teacher test_convnext has no feature maps to distil"):
        FeatureObjective(cfg, create_model(cfg.student.name, num_classes=10), plain)


def test_student_strides_it_does_not_have_are_refused(tmp_path):
    cfg = feature_cfg("feature.strides=[8,16,64]", f"data.root={tmp_path}")
    with pytest.raises(ConfigError, match=r"feature.strides: student mobilenetv4_conv_small_035 has no feature "
                                          r"map at stride 64 \(it has strides \[2, 4, 8, 16, 32\]\)"):
        plan_run(cfg, 1)


@pytest.mark.parametrize("override, message", [
    ("teacher.features=[9]", r"teacher.features: teacher test_convnext has 4 feature layers .*index 9 is outside"),
    ("teacher.features=[1,2]", r"teacher.features=\[1, 2\] must name one teacher layer .* or one per entry"),
    ("teacher.mode=offline", r"loss.feature_weight needs teacher.mode=online"),
    ("teacher.name=torchvision/resnet18", r"teacher torchvision/resnet18 has no feature maps to distil: it offers "
                                          r"neither timm's features_only \(feature_info\) nor ViT patch tokens"),
])
def test_feature_keys_the_models_cannot_meet_are_refused(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        plan_run(feature_cfg(override, f"data.root={tmp_path}"), 1)


def test_an_unlabelled_source_in_a_run_that_reads_labels_fails_in_one_line(tmp_path):
    """Through the command line: exit 2 and one `error:` line naming the key and the source."""
    proc = launches.run(PRETRAIN, "recipe=demo_feature", "loss.kd_weight=1", "loss.ce_weight=0.5", "dry_run=1",
                        f"data.root={tmp_path}", env=ENV, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: loss.ce_weight=0.5 trains on class labels, but source "
                                                   "'randaug' of data mix"), proc.stderr


def test_label_checks_name_what_needs_labels():
    labelled = DataMix.from_dict({"sources": {"a": {"shards": "x", "augment": "inception"}}}, "/")
    unlabelled = DataMix.from_dict({"sources": {"a": {"shards": "x", "augment": "inception"},
                                                "web": {"shards": "y", "augment": "inception", "labelled": False}}}, "/")
    check_labels(feature_cfg(), unlabelled, labelled)  # features alone: no labels read
    check_labels(feature_cfg("loss.kd_weight=1"), unlabelled, labelled)  # a teacher's logits need none either
    for override, key in (("baseline=labels", "baseline=labels"), ("loss.ce_weight=1", "loss.ce_weight=1")):
        with pytest.raises(ConfigError, match=f"{key}.* source 'web'"):
            check_labels(feature_cfg(override), unlabelled, labelled)
    with pytest.raises(ConfigError, match="teacher.fit_steps=150 fits the teacher on class labels, but source 'web'"):
        check_labels(feature_cfg(), labelled, unlabelled)
    with pytest.raises(MixError, match="labelled: expected true or false"):
        DataMix.from_dict({"sources": {"a": {"shards": "x", "augment": "inception", "labelled": "no"}}}, "/")


# ---- images without classes -------------------------------------------------------------------------------


def test_images_without_classes_read_as_label_minus_one(tmp_path, monkeypatch):
    folder = tmp_path / "web"
    folder.mkdir()
    image = encode_jpeg(np.full((40, 40, 3), 128, np.uint8))
    with wds.TarWriter(str(folder / "web-000000.tar")) as sink:
        for i in range(12):
            sink.write({"__key__": f"img{i:03d}", "jpg": image})  # no `cls`
    spec = {"shards": "web", "augment": {"name": "inception"}}
    unlabelled = DataMix.from_dict({"sources": {"web": {**spec, "labelled": False}}}, tmp_path)
    stream = iter(MixedStream(unlabelled, 32, seed=0, total_samples=100))
    assert {next(stream)["label"] for _ in range(12)} == {UNLABELLED}
    labelled = DataMix.from_dict({"sources": {"web": spec}}, tmp_path)
    monkeypatch.setattr(MixedStream, "MAX_CONSECUTIVE_FAILURES", 20)
    with pytest.raises(RuntimeError, match="consecutive samples failed"):  # declared labelled: every sample is bad
        next(iter(MixedStream(labelled, 32, seed=0, total_samples=100)))


def test_class_counts_skip_unlabelled_samples(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    write_shards([("a", image, 1), ("b", image, UNLABELLED), ("c", image, 1)], tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["class_counts"] == {"1": 2} and manifest["num_classes"] == 2 and manifest["num_samples"] == 3


# ---- the plan and the demo ------------------------------------------------------------------------------


def test_dinov2_recipe_plans_from_an_empty_folder_without_downloads(tmp_path):
    proc = launches.run(PRETRAIN, "recipe=mnv4_conv_s_dinov2", "dry_run=64", cwd=tmp_path, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    f = plan["features"]
    assert plan["teacher"] == "vit_small_patch14_dinov2.lvd142m" and plan["teacher_img_size"] == 224
    assert 10 < plan["teacher_gflops_per_image"] < 15  # ViT-S/14 on 256 patches
    assert f["teacher_maps"] == [[384, 16, 16]] and f["student_strides"] == [8, 16, 32] and f["runs"] == "online"
    assert f["offline_bytes_per_view_fp16"] == 384 * 16 * 16 * 2
    assert f["offline_bytes_per_epoch_fp16"] == 384 * 16 * 16 * 2 * 1_281_167
    assert "features online" in proc.stdout and "TiB for the run" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing read, nothing written


def test_demo_feature_run_lowers_its_feature_loss_and_exports_no_heads(tmp_path):
    """The demo recipe, shortened by keys, in one process: the feature loss falls, the checkpoint carries the
    projection heads (an exact resume needs them), the exported student does not."""
    out = tmp_path / "run"
    proc = launches.run(PRETRAIN, "recipe=demo_feature", f"output_dir={out}", "teacher.fit_steps=5", "train.steps=30",
                        "train.log_every=10", "optim.warmup_steps=5", "train.trackers=[jsonl]", "data.num_workers=1",
                        "data.batch_size=16", cwd=tmp_path, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    feature = [r["feature"] for r in records if "feature" in r]
    assert len(feature) == 3 and feature[-1] < 0.8 * feature[0], feature
    assert all(r["loss"] == pytest.approx(r["feature"]) for r in records if "feature" in r)
    assert "feature maps only: no top-1 measured" in proc.stdout
    trend = json.loads((out / "summary.json").read_text())["feature_loss"]
    assert trend == {"first_step": 10, "first": feature[0], "last_step": 30, "last": feature[-1]}
    assert f"feature   cosine loss {feature[0]:.3f} at step 10 -> {feature[-1]:.3f} at step 30" in proc.stdout
    ckpt = torch.load(out / "ckpt-00000030.pt", map_location="cpu", weights_only=False)
    assert any(k.startswith(f"{HEADS}.") for k in ckpt["student"])

    exported = tmp_path / "exported"
    proc = launches.run("-m distill.export", str(out), "--out", str(exported), "--weights", "student", cwd=ROOT,
                        env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    state = load_file(str(exported / "model.safetensors"))
    assert state and not any(HEADS in k for k in state)
    reference = create_model("mobilenetv4_conv_small", num_classes=10).state_dict()
    assert set(state) == set(reference)
    torch.testing.assert_close(state["conv_stem.weight"], ckpt["student"]["conv_stem.weight"])
