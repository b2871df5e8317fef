"""A run's plan before it starts (`dry_run=N`): steps from epochs of images, the MobileNetV4 recipes pinned at
64 processes in both modes, the EMA's warm-up, the teacher's side and cost, and the passes' plans."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import launches
from distill import curate, label_views
from distill.config import ConfigError, load_pretrain_config
from distill.engine.ema import build_ema, decay_at, steps_to_reach
from distill.plan import plan_run, plan_steps
from distill.models.factory import InputSpec
from distill.models.teacher import InputAdapter

ROOT = Path(__file__).resolve().parent.parent
MNV4 = ["mnv4_conv_s", "mnv4_conv_m", "mnv4_hybrid_m", "mnv4_conv_l", "mnv4_hybrid_l"]
IMAGENET = 1_281_167


def mnv4_plan(recipe: str, mode: str, tmp_path: Path, processes: int = 64) -> dict:
    extra = ["teacher.mode=offline", "data.mix=mnv4_offline"] if mode == "offline" else []
    cfg = load_pretrain_config([f"recipe={recipe}", f"data.root={tmp_path / 'no_data_here'}", *extra])
    return plan_run(cfg, processes)


@pytest.mark.parametrize("mode", ["online", "offline"])
@pytest.mark.parametrize("recipe", MNV4)
def test_mnv4_recipes_plan_epochs_of_imagenet_images_at_64_processes(recipe, mode, tmp_path):
    plan = mnv4_plan(recipe, mode, tmp_path)
    epochs = load_pretrain_config([f"recipe={recipe}"]).train.epochs
    assert plan["processes"] == 64 and plan["global_batch_size"] == 16384 and plan["per_process_batch_size"] == 256
    assert plan["samples_per_epoch"] == IMAGENET
    assert abs(plan["total_steps"] - epochs * IMAGENET / 16384) <= 1, plan
    warmup_epochs = load_pretrain_config([f"recipe={recipe}"]).optim.warmup_epochs
    assert abs(plan["warmup_steps"] - warmup_epochs * IMAGENET / 16384) <= 1
    assert plan["ema_decay_effective"] == 0.9998 and plan["ema_decay_reached_at_step"] <= plan["total_steps"] // 5
    assert plan["student_gflops_per_image"] > 0
    assert plan["source_shares"]["start"] == plan["source_shares"]["end"] == {"d1": 0.25, "d2": 0.25, "d3": 0.5}
    if mode == "online":
        assert plan["teacher_img_size"] == 475 and plan["teacher_interpolation"] == "bicubic"
        assert 300 < plan["teacher_gflops_per_image"] < 400  # EfficientNet-L2 at 475 px
        side = plan["student_img_size"]
        assert plan["teacher_gflops_per_image"] / plan["teacher_gflops_at_student_size"] == pytest.approx(
            (475 / side) ** 2, rel=0.1)  # the price of upsampling the view, as the recipe comments say
    else:
        assert plan["teacher_gflops_per_image"] == 0.0 and plan["teacher"] is None


def test_dry_run_prints_a_summary_then_json_and_reads_nothing(tmp_path):
    """From a folder with no data: exit 0, a readable summary, the JSON plan on the last line, nothing written."""
    proc = launches.run(str(ROOT / "distill" / "pretrain.py"), "recipe=mnv4_conv_l", "dry_run=64",
                        "teacher.mode=offline", "data.mix=mnv4_offline", f"data.root={tmp_path / 'none'}", cwd=tmp_path,
                        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    plan = json.loads(lines[-1])
    assert lines[0].startswith("plan: mnv4_conv_l on 64 processes") and len(lines) > 5
    for key in ("processes", "global_batch_size", "per_process_batch_size", "grad_accum", "samples_per_epoch",
                "epochs", "total_steps", "warmup_steps", "ema_decay_effective", "teacher_img_size",
                "teacher_gflops_per_image", "student_gflops_per_image", "source_shares"):
        assert key in plan, key
    assert abs(plan["total_steps"] - 2000 * IMAGENET / 16384) <= 1
    assert list(tmp_path.iterdir()) == []  # no run folder, no data generated


def _stored_source(folder: Path, views: int, images: int, old_style: bool = False) -> None:
    """A source folder as offline labelling leaves it: shards and a manifest (contents are never read here)."""
    folder.mkdir(parents=True)
    shards = [{"name": f"{folder.name}-r{r:04d}-000000.tar", "num_samples": views // 4} for r in range(4)]
    for s in shards:
        (folder / s["name"]).write_bytes(b"")
    manifest = {"num_samples": views, "shards": shards, "offline_labels": {"view": {"img_size": 32}}}
    if old_style:  # written before manifests counted images: only the replicas, by source
        manifest["offline_labels"]["replicas"] = {folder.name: views // images}
    else:
        manifest |= {"images": images, "replicas": views // images}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("old_style", [False, True])
def test_an_epoch_of_stored_views_is_a_pass_over_the_images_not_the_replicas(tmp_path, old_style):
    _stored_source(tmp_path / "views" / "d1", views=4 * 800, images=800, old_style=old_style)
    (tmp_path / "mix.yaml").write_text("sources:\n  d1: {shards: views/d1, augment: {name: flip}, weight: 1}\n")
    cfg = load_pretrain_config(["recipe=demo", f"data.mix={tmp_path / 'mix.yaml'}", f"data.root={tmp_path}",
                                "teacher.mode=offline", "train.steps=null", "train.epochs=3", "optim.warmup_steps=null",
                                "optim.warmup_epochs=1", "data.batch_size=16", "data.img_size=32"])
    from distill.data.mix import DataMix

    total, batch, warmup = plan_steps(cfg, DataMix.load(cfg.data.mix, cfg.data.root), 2)
    assert batch == 32 and total == 3 * 800 // 32 and warmup == 800 // 32  # not 4x as many: replicas are views
    plan = plan_run(cfg, 2)
    assert plan["samples_per_epoch"] == 800 and not any("stored views" in n for n in plan["notes"])
    cfg.data.img_size = 64  # a student at another side than the stored views: the plan says the run will refuse
    assert any("stored views are 32 px" in n for n in plan_run(cfg, 2)["notes"])


def test_an_unknown_epoch_size_is_named():
    cfg = load_pretrain_config(["recipe=demo", "data.root=/nonexistent", "train.steps=null"])
    with pytest.raises(ConfigError, match="samples_per_epoch"):
        plan_run(cfg, 1)


# ---- the EMA ------------------------------------------------------------------------------------------


def test_ema_reaches_the_recipe_decay_early_and_averages_until_then():
    # timm's default warm-up (power 2/3) would still be at 0.9990 after the 31K steps of a 400-epoch run
    assert steps_to_reach(0.9998) == 5000 and decay_at(31_279, 0.9998) == 0.9998
    model = torch.nn.Linear(1, 1, bias=False)
    ema = build_ema(model, decay=0.9)
    for step in range(30):
        model.weight.data.fill_(float(step))
        assert ema.get_decay(step) == decay_at(step, 0.9)  # the plan's figure is the EMA's own
        ema.update(model, step=step)
        if step <= steps_to_reach(0.9) - 1:  # still warming up: the plain mean of the weights so far
            assert ema.module.weight.item() == pytest.approx(sum(range(1, step + 1)) / max(step, 1))
    assert decay_at(29, 0.9) == 0.9 and decay_at(29, 0.9, warmup=False) == 0.9


# ---- the teacher's side and interpolation ---------------------------------------------------------------


def test_every_mnv4_recipe_states_the_teacher_side_and_interpolation():
    for recipe in MNV4:
        own = yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text())
        assert own["teacher"]["img_size"] == 475 and own["teacher"]["interpolation"] == "bicubic", recipe
        text = (ROOT / "recipes" / f"{recipe}.yaml").read_text()
        assert "GFLOPs" in text  # the comment gives the choice's cost
        cfg = load_pretrain_config([f"recipe={recipe}"])
        assert cfg.student.drop_path_rate == 0.0  # the paper's distillation: final-layer dropout only


def test_teacher_input_resizes_with_the_chosen_interpolation():
    spec = InputSpec((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 64, "bicubic")
    x = torch.rand(2, 3, 24, 24)
    want = F.interpolate(x, size=(64, 64), mode="bicubic", antialias=True).clamp(0, 1)
    assert torch.allclose(InputAdapter(spec, 64)(x), want)  # the model's own (bicubic) by default
    bilinear = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)
    assert torch.allclose(InputAdapter(spec, 64, "bilinear")(x), bilinear)
    with pytest.raises(ConfigError, match="teacher.interpolation"):
        load_pretrain_config(["recipe=mnv4_conv_s", "teacher.interpolation=lanczos"])


# ---- the passes' plans ----------------------------------------------------------------------------------


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_label_views_plan_counts_views_bytes_and_teacher_cost(capsys, tmp_path):
    label_views.main(["recipe=label_mnv4", "dry_run=64", f"data_root={tmp_path / 'none'}"])
    plan = last_json(capsys)
    assert plan["sources"]["d1"]["views"] == IMAGENET * 500 and plan["sources"]["d3"]["views"] == 130_000_000 * 10
    assert plan["views"] == IMAGENET * 1500 + 1_300_000_000
    assert plan["targets"] == "full" and plan["label_bytes_per_view"] == 3072  # 1000 float16 + header, tar-padded
    assert plan["label_bytes_per_view_if_topk"] == 1024
    assert plan["bytes"] == plan["views"] * plan["bytes_per_view"]
    assert plan["teacher_pflops"] == pytest.approx(plan["views"] * plan["teacher_gflops_per_view"] / 1e6, rel=1e-3)
    assert not (tmp_path / "none").exists()


def test_curate_plan_counts_images_and_scorer_cost(capsys, tmp_path):
    curate.main(["recipe=curate_d3", "dry_run=8", f"data_root={tmp_path / 'none'}", "pool.num_images=1000000"])
    plan = last_json(capsys)
    assert plan["pool_images"] == 1_000_000 and plan["scorer_img_size"] == 224
    assert plan["scorer_pflops"] == pytest.approx(1e6 * plan["scorer_gflops_per_image"] / 1e6, rel=1e-2)
    assert plan["output_images_at_most"] == 130_000 * 1000
    assert plan["score_memory_per_process_bytes"] == 125_000 * 44  # bounded by each process's share of the pool
    assert not (tmp_path / "none").exists()
