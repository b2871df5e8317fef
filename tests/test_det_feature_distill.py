"""Feature distillation into the encoder during detection fine-tuning (`distill.detection.feature_distill`):
the term is computed and learns, stays out of the detector and its exports, is off by default, and resumes
exactly; bad settings fail in one line."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from det_steps import step_parts
from launches import finish, torchrun

from distill.data.synthetic_coco import generate_coco_shapes
from distill.detection.feature_distill import adapted_weight, build_feature_distill
from distill.engine.checkpoint import load_checkpoint
from distill.detection.recipe import load_det_config
from distill.errors import ConfigError

# A tiny detector on 64 px images; the teacher a small random timm model (no weights are read).
TINY = """
model: {backbone: test_efficientnet, hidden_dim: 32, dim_feedforward: 64, num_heads: 2, num_queries: 10,
        num_decoder_layers: 2, num_points: 2, num_denoising: 4, num_classes: 3}
data: {root: %(root)s, train_images: train/images, train_ann: train/annotations.json,
       val_images: train/images, val_ann: train/annotations.json, img_size: 64, multiscale: [],
       batch_size: 4, val_batch_size: 8, num_workers: 0}
optim: {lr: 0.002, backbone_lr: 0.002, warmup_steps: 0, clip_grad: 1.0}
train: {steps: 4, ckpt_every: 2, keep_ckpts: 5, log_every: 1, ema_decay: 0.9, ema_warmups: 0, no_aug_epochs: 0,
        precision: 'no', trackers: [jsonl]}
eval: {visualize: 0, num_top: 20}
"""
TEACHER = ["distill.teacher=test_resnet", "distill.teacher_pretrained=false", "distill.teacher_img_size=64"]
FINETUNE = str(Path(__file__).resolve().parent.parent / "distill" / "finetune_det.py")


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("detfeat")
    generate_coco_shapes(root / "shapes", num_train=8, num_val=2, img_size=64, num_classes=3, max_objects=2, seed=0)
    (root / "tiny.yaml").write_text(TINY % {"root": root / "shapes"})
    return root


def config(world: Path, *overrides: str):
    return load_det_config([f"recipe={world / 'tiny.yaml'}", *overrides])


CPU = SimpleNamespace(device=torch.device("cpu"), num_processes=1, is_main_process=True, mixed_precision="no")


def fixed_batch(world: Path, cfg) -> dict:
    from distill.data.coco import CocoDetection, collate_detection

    data = CocoDetection(world / "shapes/train/images", world / "shapes/train/annotations.json", False, 64)
    return collate_detection([data[i] for i in range(4)])


# ---- the term --------------------------------------------------------------------------------------------


def test_the_term_is_logged_and_falls_on_a_fixed_batch(world):
    from distill.finetune_det import detection_step

    cfg = config(world, *TEACHER, "distill.schedule=constant", "optim.lr=0.005")
    parts = step_parts(cfg)
    batch = fixed_batch(world, cfg)
    head_before = [p.detach().clone() for p in parts.feature_distill.parameters()]
    terms = [detection_step(parts, [batch], cfg, step)[0]["loss_distill"].item() for step in range(8)]
    assert all(t > 0 for t in terms)
    assert terms[-1] < 0.7 * terms[0], terms
    assert any(not torch.equal(a, b) for a, b in zip(head_before, parts.feature_distill.parameters()))
    assert parts.feature_distill.weight == 5.0  # constant


def test_off_by_default_and_the_detector_untouched(world):
    """Without the section nothing is built; with it, the detector's state keys and its losses on a batch are
    those of a run without it (the tap only reads), beside the new `loss_distill`."""
    from distill.finetune_det import detection_step

    plain_cfg = config(world)
    assert plain_cfg.distill.teacher is None and build_feature_distill(plain_cfg, None, CPU, 1.0, 0) is None
    plain = step_parts(plain_cfg)
    assert plain.feature_distill is None
    batch = fixed_batch(world, plain_cfg)
    torch.manual_seed(1)  # the denoising queries' noise alike in both runs (as `seed_process` makes it in a run)
    plain_losses, _, _ = detection_step(plain, [batch], plain_cfg, 0)

    cfg = config(world, *TEACHER)
    distilled = step_parts(cfg)
    assert distilled.model.state_dict().keys() == plain.model.state_dict().keys()
    assert distilled.ema.module.state_dict().keys() == plain.ema.module.state_dict().keys()
    torch.manual_seed(1)
    losses, _, _ = detection_step(distilled, [batch], cfg, 0)
    assert set(losses) == set(plain_losses) | {"loss_distill"}
    for name, value in plain_losses.items():
        assert torch.equal(value, losses[name]), name

    # outside training the tap keeps nothing and the detector's outputs carry no term
    net = distilled.model.eval()
    with torch.no_grad():
        outputs = net(torch.zeros(1, 3, 64, 64))
    assert distilled.feature_distill.encoder_tap.map is None
    assert set(outputs) == set(plain.model.eval()(torch.zeros(1, 3, 64, 64)))


def test_encoder_level_selects_an_output_stride(world):
    cfg = config(world, *TEACHER, "distill.encoder_level=16")
    parts = step_parts(cfg)
    images = torch.randn(2, 3, 64, 64)
    with parts.feature_distill.capturing() as tap:
        parts.model(images)
    assert tuple(tap.map.shape) == (2, 32, 4, 4)  # the stride-16 output of the fusion, width 32
    assert parts.feature_distill.loss(images)["loss_distill"].item() > 0


# ---- the adaptive weight ---------------------------------------------------------------------------------


def test_adaptive_weight_moves_the_share_into_its_band():
    free = math.inf  # no ceiling
    assert adapted_weight(5.0, 11.5, 11.0, 1.0, free) == 5.0  # inside the band
    # below the band, towards its upper edge: odds(12%) / odds(5%) = (0.12 * 0.95) / (0.05 * 0.88)
    assert adapted_weight(5.0, 5.0, 11.0, 1.0, free) == pytest.approx(5.0 * 0.12 * 0.95 / (0.05 * 0.88))
    # above it, towards its lower edge: odds(10%) / odds(50%)
    assert adapted_weight(5.0, 50.0, 11.0, 1.0, free) == pytest.approx(5.0 * 0.10 * 0.5 / (0.5 * 0.90))
    assert adapted_weight(5.0, 0.01, 11.0, 1.0, free) == pytest.approx(50.0)  # at most ten times
    assert adapted_weight(5.0, 99.99, 2.0, 0.1, free) == pytest.approx(0.5)  # at least a tenth


def test_adaptive_weight_never_passes_its_ceiling():
    raised = 5.0 * 0.12 * 0.95 / (0.05 * 0.88)  # 12.95: below the ceiling, the update as without one
    assert adapted_weight(5.0, 5.0, 11.0, 1.0, 20.0) == pytest.approx(raised)
    assert adapted_weight(5.0, 0.01, 11.0, 1.0, 20.0) == 20.0  # ten times would be 50
    assert adapted_weight(20.0, 0.01, 11.0, 1.0, 20.0) == 20.0  # held there, epoch after epoch
    assert adapted_weight(20.0, 50.0, 11.0, 1.0, 20.0) == pytest.approx(20.0 * 0.10 * 0.5 / (0.5 * 0.90))
    # a weight above the ceiling (a checkpoint of a run with a higher one) comes down to it, in the band too
    assert adapted_weight(30.0, 11.5, 11.0, 1.0, 20.0) == 20.0
    assert adapted_weight(30.0, 99.99, 2.0, 0.1, 20.0) == 3.0  # a tenth of it, below the ceiling already


def test_the_share_rises_towards_all_of_it_as_the_weight_grows(world):
    """The share is taken against the decoder, which the distillation gradient never reaches: a large enough
    weight gives the attention nearly all of it, so a band is always within reach of some weight (against the
    whole model's gradient, backbone and head included, it levelled off at a few percent)."""
    from distill.finetune_det import detection_step

    shares = {}
    for weight in (1e-3, 5.0, 1e4):
        cfg = config(world, *TEACHER, f"distill.weight={weight}", f"distill.final_weight={weight}")
        parts = step_parts(cfg)  # two steps an epoch: the first step's share stays in share_sum
        torch.manual_seed(1)
        detection_step(parts, [fixed_batch(world, cfg)], cfg, 0)
        shares[weight] = float(parts.feature_distill.share_sum)
    assert shares[1e-3] < shares[5.0] < shares[1e4]
    assert shares[1e-3] < 50 and shares[1e4] > 95, shares


def test_adaptive_schedule_updates_at_epoch_ends(world):
    """The share is measured on real gradients; the weight changes only when an epoch ends, and in the last
    epochs without strong augmentation it is the final weight."""
    from distill.finetune_det import detection_step

    cfg = config(world, *TEACHER, "distill.grad_share=99", "distill.grad_share_tolerance=0.5")
    parts = step_parts(cfg)  # two steps an epoch, strong augmentation until step 100
    distill = parts.feature_distill
    batch = fixed_batch(world, cfg)
    detection_step(parts, [batch], cfg, 0)
    assert distill.weight == 5.0 and float(distill.share_count) == 1
    share = float(distill.share_sum)
    assert 0 < share < 98.5
    detection_step(parts, [batch], cfg, 1)  # the epoch ends: a share below the band raises the weight
    assert distill.weight > 5.0 and float(distill.share_count) == 0
    distill.strong_until = 2
    detection_step(parts, [batch], cfg, 2)
    detection_step(parts, [batch], cfg, 3)
    assert distill.weight == cfg.distill.final_weight


def test_the_weight_and_its_ceiling_round_trip_and_a_lower_ceiling_applies_at_load(world):
    cfg = config(world, *TEACHER)
    saved = step_parts(cfg).feature_distill
    saved.weight = 17.5
    state = saved.state_dict()
    assert state["max_weight"] == 20.0  # four starting weights by default
    again = step_parts(cfg).feature_distill
    again.load_state_dict(state)
    assert again.weight == 17.5 and again.state_dict()["max_weight"] == 20.0
    lower = step_parts(config(world, *TEACHER, "distill.max_weight=10", "distill.final_weight=10")).feature_distill
    lower.load_state_dict(state)
    assert lower.weight == 10.0


# ---- a run: logged, checkpointed, resumed, exported without it ---------------------------------------------


def finetune(world: Path, out: Path, *args: str) -> dict:
    from distill.finetune_det import main

    return main([f"recipe={world / 'tiny.yaml'}", f"output_dir={out}", *TEACHER, *args])


def test_a_run_logs_the_term_resumes_exactly_and_exports_without_it(world, tmp_path):
    from distill.detection.run import load_detector

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    summary = finetune(world, whole)
    assert summary["steps"] == 4
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss_distill" in r] == [1, 2, 3, 4]

    final = torch.load(whole / "ckpt-00000004.pt", weights_only=False)
    for part in ("model", "ema"):
        assert not [k for k in final[part] if "head" in k.split(".")[0] or "teacher" in k]
    assert set(final["feature_distill"]) == {"head", "weight", "max_weight", "share_sum", "share_count"}
    # the adaptive weight moved at the ends of epochs 1 and 2 (two steps each)
    assert final["feature_distill"]["weight"] != 5.0

    # resumed from the step-2 checkpoint: the detector, the head and the weight as in the whole run
    finetune(world, resumed, f"resume={whole / 'ckpt-00000002.pt'}")
    again = torch.load(resumed / "ckpt-00000004.pt", weights_only=False)
    assert again["feature_distill"]["weight"] == final["feature_distill"]["weight"]
    for part, state in (("model", final["model"]), ("head", final["feature_distill"]["head"])):
        other = again["model"] if part == "model" else again["feature_distill"]["head"]
        for k in state:
            assert torch.equal(state[k], other[k]), f"{part}.{k} differs after resume"

    # the export path builds the bare detector from the run's config and loads its weights strictly
    run = load_detector(whole, "ema", img_size=64, deploy=True)
    with torch.no_grad():
        outputs = run.model(torch.zeros(1, 3, 64, 64))
    assert outputs["pred_logits"].shape == (1, 10, 3)
    ort = pytest.importorskip("onnxruntime")
    from distill.export.onnx_detector import export_onnx_detector

    onnx_file = export_onnx_detector(whole, tmp_path / "onnx", img_size=64) / "model.onnx"
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "orig_sizes"]
    scores, _, boxes = session.run(None, {"images": torch.rand(2, 3, 64, 64).numpy(),
                                          "orig_sizes": torch.tensor([[64.0, 64.0], [128.0, 96.0]]).numpy()})
    assert scores.shape == (2, 20) and boxes.shape == (2, 20, 4)


# A band beyond what the default ceiling (4 x 5 = 20) lets the weight reach: on two gloo processes, epochs of
# two steps (8 images, 2 a process a step), the adaptive weight must stop at the ceiling
OUT_OF_REACH = [*TEACHER, "distill.schedule=adaptive", "distill.grad_share=99", "distill.grad_share_tolerance=0.5",
                "data.batch_size=2", "train.steps=8", "train.ckpt_every=4", "eval.num_top=10"]


def two_processes(world: Path, out: Path, *args: str) -> Path:
    finish(torchrun(FINETUNE, 2, out, f"recipe={world / 'tiny.yaml'}", *OUT_OF_REACH, *args), out)
    return out


@pytest.fixture(scope="module")
def held(world, tmp_path_factory) -> Path:
    return two_processes(world, tmp_path_factory.mktemp("held") / "run")


def test_the_ceiling_holds_the_weight_and_says_so(held):
    """Without a ceiling the weight went 5 -> 50 -> 470 -> 3,332 -> 17,289 here and the term was 99% of the
    loss; with it, the weight stops at 20, the main process warns once an epoch, and the term stays within
    what the ceiling allows (cosine: 1 - cos <= 2 per location)."""
    final = load_checkpoint(held / "ckpt-00000008.pt")["feature_distill"]
    assert final["weight"] == 20.0, final["weight"]
    assert final["max_weight"] == 20.0
    log = Path(f"{held}.log").read_text()
    warned = [line.split("epoch ")[1].split(":")[0] for line in log.splitlines()
              if "weight held at its ceiling distill.max_weight=20" in line]
    assert warned == ["0", "1", "2", "3"], log[-3000:]  # every epoch end, from one process
    records = [json.loads(line) for line in (held / "metrics.jsonl").read_text().splitlines()]
    terms = [r["loss_distill"] for r in records if "loss_distill" in r]
    assert len(terms) == 8 and max(terms) <= 2 * 20.0, terms
    assert min(terms[2:]) > 2 * max(terms[:2]), terms  # the weight did rise, from 5 to the ceiling, after step 2


def test_a_resume_keeps_the_held_weight(world, held, tmp_path):
    """Resumed from the step-4 checkpoint (weight at the ceiling): the run ends as the one never stopped, the
    term's weight and state and the detector alike."""
    resumed = two_processes(world, tmp_path / "resumed", f"resume={held / 'ckpt-00000004.pt'}")
    a, b = (load_checkpoint(run / "ckpt-00000008.pt") for run in (held, resumed))
    assert b["feature_distill"]["weight"] == a["feature_distill"]["weight"] == 20.0
    assert b["feature_distill"]["max_weight"] == 20.0
    for key in ("share_sum", "share_count"):
        assert torch.equal(a["feature_distill"][key], b["feature_distill"][key]), key
    for part, state, other in (("model", a["model"], b["model"]),
                               ("head", a["feature_distill"]["head"], b["feature_distill"]["head"])):
        differ = [k for k in state if not torch.equal(state[k], other[k])]
        assert not differ, (part, differ[:5])


# ---- errors, one line each -------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["distill.teacher=torchvision/resnet18"],
     r"^distill.teacher torchvision/resnet18 has no feature maps to distil: it offers neither timm's "
     r"features_only \(feature_info\) nor ViT patch tokens$"),
    ([*TEACHER, "distill.encoder_level=64"],
     r"^distill.encoder_level='64': the encoder has no such level; give 'attention' or one of its output "
     r"strides \[8, 16, 32\]$"),
    ([*TEACHER, "distill.encoder_level=last"], r"^distill.encoder_level='last': the encoder has no such level"),
    ([*TEACHER, "distill.teacher_features=7"],
     r"^distill.teacher_features: distill.teacher test_resnet has 5 feature layers .* index 7 is outside them$"),
])
def test_settings_the_models_cannot_meet_fail_in_one_line(world, overrides, message):
    from distill.detection.rtdetr import build_rtdetr
    from distill.finetune_det import model_config

    cfg = config(world, *overrides, "distill.teacher_img_size=64", "distill.teacher_pretrained=false")
    model = build_rtdetr(model_config(cfg.model))
    with pytest.raises(ConfigError, match=message) as caught:
        build_feature_distill(cfg, model, CPU, 2.0, 100)
    assert "\n" not in str(caught.value)


def test_a_local_teacher_checkpoint_is_read_without_its_classifier(world, tmp_path):
    """`distill.teacher_checkpoint`: a teacher trained elsewhere (here a 7-class classifier) gives its feature
    layers; a checkpoint of another model is refused naming the keys that differ."""
    from distill.detection.rtdetr import build_rtdetr
    from distill.engine.checkpoint import CheckpointMismatch
    from distill.finetune_det import model_config
    from distill.models.factory import create_model

    trained = create_model("test_resnet", num_classes=7)
    torch.save(trained.state_dict(), tmp_path / "teacher.pt")
    cfg = config(world, *TEACHER, f"distill.teacher_checkpoint={tmp_path / 'teacher.pt'}")
    distill = build_feature_distill(cfg, build_rtdetr(model_config(cfg.model)), CPU, 2.0, 100)
    loaded = distill.teacher.model.state_dict()
    assert loaded and all(torch.equal(loaded[k], trained.state_dict()[k]) for k in loaded)
    assert not any(k.startswith("fc.") for k in loaded)  # no classifier was built

    torch.save(create_model("resnet10t", num_classes=7).state_dict(), tmp_path / "other.pt")
    cfg = config(world, *TEACHER, f"distill.teacher_checkpoint={tmp_path / 'other.pt'}")
    with pytest.raises(CheckpointMismatch, match=r"other\.pt does not fit the distill\.teacher test_resnet"):
        build_feature_distill(cfg, build_rtdetr(model_config(cfg.model)), CPU, 2.0, 100)
    cfg = config(world, *TEACHER, f"distill.teacher_checkpoint={tmp_path / 'absent.pt'}")
    with pytest.raises(ConfigError, match=r"^distill\.teacher_checkpoint=.*absent\.pt: no such file or folder$"):
        build_feature_distill(cfg, build_rtdetr(model_config(cfg.model)), CPU, 2.0, 100)


def test_bad_values_are_refused_at_load(world):
    with pytest.raises(ConfigError, match="distill.schedule"):
        config(world, "distill.schedule=cosine")
    with pytest.raises(ConfigError, match="distill.loss"):
        config(world, "distill.loss=kl")
    with pytest.raises(ConfigError, match=r"^distill.max_weight=0.0 must be above 0"):
        config(world, *TEACHER, "distill.max_weight=0")
    with pytest.raises(ConfigError, match=r"^distill.weight=30 is above distill.max_weight=25: raise"):
        config(world, *TEACHER, "distill.weight=30", "distill.max_weight=25")
    # the default ceiling is four starting weights; the final weight of the adaptive schedule is under it too
    with pytest.raises(ConfigError, match=r"^distill.final_weight=20 is above distill.max_weight=8 "
                                          r"\(4 x distill.weight\)"):
        config(world, *TEACHER, "distill.weight=2")
    assert config(world, *TEACHER, "distill.weight=2", "distill.schedule=constant").distill.weight == 2


def test_the_demo_recipe_names_a_teacher_and_keeps_det_demo_otherwise():
    demo, feature = load_det_config(["recipe=det_demo"]), load_det_config(["recipe=det_demo_feature"])
    assert demo.distill.teacher is None and feature.distill.teacher == "test_vit"
    assert feature.distill.teacher_pretrained is False
    assert feature.model == demo.model and feature.train == demo.train and feature.data == demo.data
