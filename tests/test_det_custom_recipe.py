"""Fine-tuning on a user's own data: recipes/finetune_custom.yaml from `data.root` alone, its schedule sized by
the training set, per-epoch evaluation, a detector started from a run's best.pt with another class count, and
the dfine_* / rtdetr_* recipes on a YOLO dataset."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from distill.data.coco import batches_per_epoch
from distill.detection.recipe import load_det_config
from distill.detection.schedule import apply_scaled_schedule, explicit_keys, scaled_schedule
from test_det_layouts import make_pool, write_yolo

FINETUNE = str(Path(__file__).resolve().parent.parent / "distill" / "finetune_det.py")

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py

# a tiny detector and run over the generated YOLO set (8 training images of ~80 px)
TINY = ["model.backbone=test_efficientnet", "model.pretrained_backbone=false", "model.hidden_dim=32",
        "model.dim_feedforward=64", "model.num_heads=2",
        "model.num_queries=20", "model.num_decoder_layers=1", "model.num_points=2", "model.num_denoising=10",
        "data.img_size=64", "data.multiscale=[]", "data.global_batch_size=null", "data.batch_size=4",
        "data.val_batch_size=4", "data.num_workers=0", "train.precision='no'", "train.trackers=[jsonl]",
        "train.log_every=1", "eval.visualize=0"]


@pytest.fixture(scope="module")
def yolo_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("custom")
    return write_yolo(make_pool(folder / "pool"), folder / "pool", folder / "yolo") / "data.yaml"


def finetune(recipe: str, data_yaml: Path, out: Path, *args: str) -> dict:
    from distill.finetune_det import main

    return main([f"recipe={recipe}", f"data.root={data_yaml}", f"output_dir={out}", *TINY, *args])


def steps_an_epoch(images: int, batch: int = 16) -> int:
    return batches_per_epoch(images, batch, 1)


def test_small_and_large_sets_get_their_own_schedule():
    small, mid, large = (scaled_schedule(n, steps_an_epoch(n)) for n in (300, 3_000, 118_000))
    # a small set: many epochs, a short warm-up, no strong augmentation and no Mosaic at all
    assert small.no_aug_epochs == small.epochs and small.mosaic_prob == 0
    assert small.epochs > large.epochs and small.warmup_steps < large.warmup_steps
    assert small.warmup_steps <= small.epochs * steps_an_epoch(300) / 10
    # a mid-sized one: strong augmentations with a tail, still no Mosaic
    assert 0 < mid.no_aug_epochs < mid.epochs and mid.mosaic_prob == 0
    # a large one: strong augmentations and Mosaic, a longer EMA horizon
    assert large.no_aug_epochs < large.epochs and large.mosaic_prob > 0
    assert small.ema_decay < large.ema_decay <= 0.9999


def test_resumed_run_gets_the_same_schedule_and_explicit_keys_win():
    argv = ["recipe=finetune_custom", "data.root=x/data.yaml", "train.no_aug_epochs=3", "optim.warmup_steps=7"]
    chosen = []
    for _ in range(2):  # a first launch and a resumed one: same data, same batch
        cfg = load_det_config(argv, trackers=False)
        apply_scaled_schedule(cfg, 300, steps_an_epoch(300), explicit_keys(argv))
        chosen.append(OmegaConf.to_container(cfg))
    assert chosen[0] == chosen[1]
    assert chosen[0]["train"]["no_aug_epochs"] == 3 and chosen[0]["optim"]["warmup_steps"] == 7
    assert chosen[0]["train"]["epochs"] == scaled_schedule(300, steps_an_epoch(300)).epochs


def test_custom_recipe_from_data_root_alone_then_init_from_its_best(yolo_set, tmp_path):
    """Two steps an epoch: evaluated at step 2 and at the end; best.pt is the best of the evaluations; a
    second run with four classes starts from it, its class heads re-initialised."""
    s = finetune("finetune_custom", yolo_set, tmp_path / "a", "train.steps=4")
    assert s["steps"] == 4
    cfg = OmegaConf.load(tmp_path / "a" / "config.yaml")
    assert cfg.model.num_classes == 3 and cfg.train.eval_every == 2
    assert cfg.train.no_aug_epochs == 2  # 8 images: no strong augmentation in the run's 2 epochs
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evaluated = sorted({r["step"] for r in rows if "AP" in r})
    assert evaluated == [2, 4]
    best_ap = max(r["AP"] for r in rows if "AP" in r)
    assert s["best"]["AP"] == pytest.approx(best_ap)
    assert (tmp_path / "a" / "best.pt").is_file()

    four = yolo_set.parent.parent / "yolo4"
    if not four.exists():
        import shutil

        shutil.copytree(yolo_set.parent, four)
        text = (four / "data.yaml").read_text().replace("2: triangle}", "2: triangle, 3: star}")
        (four / "data.yaml").write_text(text)
    finetune("finetune_custom", four / "data.yaml", tmp_path / "b", "train.steps=2",
             f"model.init_from={tmp_path / 'a' / 'best.pt'}")
    assert OmegaConf.load(tmp_path / "b" / "config.yaml").model.num_classes == 4
    report = json.loads((tmp_path / "b" / "init_from.json").read_text())
    assert report["reinitialised"] and report["loaded"]
    # a whole detector: its backbone came along (none named by model.backbone_checkpoint)
    assert not report["kept"] and any(k.startswith("backbone.") for k in report["loaded"])


@pytest.mark.parametrize("recipe,extra", [
    ("rtdetr_mnv4_conv_s", []),
    ("dfine_s", ["model.num_points_per_level=[1,1,1]", "model.depth_mult=0.34"]),
])
def test_model_recipes_on_a_yolo_set(recipe, extra, yolo_set, tmp_path):
    s = finetune(recipe, yolo_set, tmp_path / recipe, "train.steps=2", "train.eval_every=0", *extra)
    assert s["steps"] == 2 and OmegaConf.load(tmp_path / recipe / "config.yaml").model.num_classes == 3


def test_keys_given_in_any_spelling_the_configuration_reads_win():
    argv = ["recipe=finetune_custom", "data.root=x/data.yaml", "--train.no_aug_epochs=3", "--optim.warmup_steps=7"]
    cfg = load_det_config(argv, trackers=False)
    apply_scaled_schedule(cfg, 3_000, steps_an_epoch(3_000), explicit_keys(argv))
    assert (cfg.train.no_aug_epochs, cfg.optim.warmup_steps) == (3, 7)


def test_epochs_given_on_the_command_line_size_the_derived_keys():
    """`train.epochs=N` wins, and the warm-up, tail and EMA follow a run of N epochs, not the scaled length."""
    argv = ["recipe=finetune_custom", "data.root=x/data.yaml", "train.epochs=30"]
    cfg = load_det_config(argv, trackers=False)
    per_epoch = steps_an_epoch(3_000)
    apply_scaled_schedule(cfg, 3_000, per_epoch, explicit_keys(argv))
    expected = scaled_schedule(3_000, per_epoch, 30 * per_epoch)
    assert cfg.train.epochs == 30
    assert cfg.train.no_aug_epochs == expected.no_aug_epochs == 3
    assert (cfg.optim.warmup_steps, cfg.train.ema_warmups, cfg.train.ema_decay) == (
        expected.warmup_steps, expected.ema_warmups, expected.ema_decay)


def test_processes_that_read_different_training_sets_stop_with_one_error(tmp_path):
    """Node-local copies of a COCO set that differ (8 and 12 images): every process stops with the same error
    before any training, instead of training schedules of their own."""
    import launches

    from distill.data.synthetic_coco import generate_coco_shapes

    for rank, images in enumerate((8, 12)):
        generate_coco_shapes(tmp_path / f"set{rank}", num_train=images, num_val=4, img_size=64, num_classes=3,
                             max_objects=2, seed=0)
    out = tmp_path / "run"
    layout = ["data.train_images=train/images", "data.train_ann=train/annotations.json",
              "data.val_images=val/images", "data.val_ann=val/annotations.json"]
    # started as srun starts them: no launcher stops one process once the other has ended
    procs = launches.ranks(str(ROOT / "distill" / "finetune_det.py"), 2, out, "recipe=finetune_custom",
                           f"data.root={tmp_path}/set${{oc.env:RANK}}", *TINY, *layout, "train.steps=2")
    assert [p.wait(timeout=600) for p in procs] == [2, 2]
    log = Path(f"{out}.log").read_text()
    assert log.count("error: the processes read different training sets") == 2, log[-3000:]


def test_a_run_that_fails_with_its_loader_workers_running_ends(yolo_set, tmp_path):
    """Loader workers ignore the stop signals; a run that fails on a defect while they run (its traceback, kept by
    the interpreter, holds their iterator) must still end rather than wait for them at exit."""
    import launches

    faulty = str(Path(FINETUNE).parent.parent / "tests" / "faulty_finetune.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CRASH_AT_STEP": "2"}
    done = launches.run(faulty, "recipe=finetune_custom", f"data.root={yolo_set}", f"output_dir={tmp_path / 'r'}",
                        *TINY, "data.num_workers=1", "train.steps=4", env=env, timeout=120)
    assert done.returncode == 1 and "a fault put in at this step" in done.stderr, done.stderr[-2000:]
