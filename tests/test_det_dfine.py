"""The D-FINE head as an option of the detector: configuration, presets, training, evaluation end to end.
Its fidelity to the official code is tests/test_det_dfine_fidelity.py."""
import json

import pytest
import torch

from distill.config import ConfigError
from distill.data.synthetic_coco import generate_coco_shapes
from distill.detection.criterion import RTDETRCriterion
from distill.detection.decoder import RTDETRDecoder
from distill.detection.dfine_criterion import DFINECriterion
from distill.detection.dfine_decoder import DFineDecoder
from distill.detection.postprocess import PostProcessor
from distill.detection.recipe import load_det_config
from distill.detection.rtdetr import build_criterion, build_rtdetr, rtdetr_config

TINY = dict(hidden_dim=32, num_heads=4, dim_feedforward=64, num_queries=10, num_denoising=6, depth_mult=0.34)


def _targets():
    return [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.3, 0.4], [0.7, 0.6, 0.4, 0.3]])},
            {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.6]])}]


def test_head_key_builds_the_head_and_its_loss():
    torch.manual_seed(0)
    plain = rtdetr_config("test_resnet", 3, **TINY)
    assert plain.head == "rtdetrv2"  # the default stays RT-DETRv2
    assert isinstance(build_rtdetr(plain).decoder, RTDETRDecoder)
    assert type(build_criterion(plain)) is RTDETRCriterion

    cfg = rtdetr_config("test_resnet", 3, head="dfine", num_points_per_level=(3, 6, 3), **TINY)
    model = build_rtdetr(cfg)
    assert isinstance(model.decoder, DFineDecoder)
    assert model.decoder.layers[0].cross_attn.points_per_level == [3, 6, 3]
    criterion = build_criterion(cfg)
    assert isinstance(criterion, DFINECriterion)
    assert criterion.weights == {"vfl": 1.0, "mal": 1.0, "bbox": 5.0, "giou": 2.0, "fgl": 0.15, "ddf": 1.5}
    assert (criterion.reg_max, criterion.reg_scale, criterion.classification, criterion.gamma) == (32, 4.0, "vfl", 2.0)
    for head in ("dfine", "rtdetrv2"):  # DEIM's matchability-aware loss, for either head
        mal = build_criterion(rtdetr_config("test_resnet", 3, head=head, class_loss="mal", **TINY))
        assert (mal.classification, mal.gamma, mal.alpha) == ("mal", 1.5, 0.75)


def test_dfine_presets_are_the_n_and_s_sizes():
    n, s = rtdetr_config("test_resnet", 80, preset="dfine_n"), rtdetr_config("test_resnet", 80, preset="dfine_s")
    assert (n.head, n.hidden_dim, n.expansion, n.depth_mult, n.dim_feedforward, tuple(n.out_strides), n.num_points,
            n.num_decoder_layers) == ("dfine", 128, 0.34, 0.5, 512, (16, 32), 6, 3)
    assert (s.head, s.hidden_dim, s.expansion, s.depth_mult, s.dim_feedforward, tuple(s.out_strides),
            tuple(s.num_points_per_level), s.num_decoder_layers) == ("dfine", 256, 0.5, 0.34, 1024, (8, 16, 32),
                                                                      (3, 6, 3), 3)
    model = build_rtdetr(n)
    assert [layer.cross_attn.points_per_level for layer in model.decoder.layers] == [[6, 6]] * 3


@pytest.mark.parametrize("size", ["n", "s"])
def test_dfine_recipes_hold_the_presets_and_the_reference_schedule(size):
    from omegaconf import OmegaConf

    from distill.detection.rtdetr import PRESETS

    cfg = load_det_config([f"recipe=dfine_{size}"])
    preset = rtdetr_config(cfg.model.backbone, 80, preset=f"dfine_{size}")
    for key in [*PRESETS[f"dfine_{size}"], "reg_max", "reg_scale", "num_queries", "num_denoising"]:
        got, want = cfg.model[key], getattr(preset, key)
        got = list(got) if OmegaConf.is_list(got) else got
        assert got == (list(want) if isinstance(want, tuple) else want), key
    schedule = {"n": (8e-4, 4e-4, 128, 160, 12), "s": (2e-4, 1e-4, 32, 132, 12)}[size]
    assert (cfg.optim.lr, cfg.optim.backbone_lr, cfg.data.global_batch_size, cfg.train.epochs,
            cfg.train.no_aug_epochs) == schedule
    assert (cfg.optim.warmup_steps, cfg.train.ema_warmups, cfg.optim.clip_grad) == (500, 1000, 0.1)
    sides = list(cfg.data.multiscale)
    assert sides == ([] if size == "n" else [480, 512, 544, 576, 608] + [640] * 20 + [672, 704, 736, 768, 800])


# DEIM-D-FINE's schedules (configs/deim_dfine/deim_hgnetv2_{s,m,l}_coco.yml over configs/base/deim.yml):
# epochs, flat_epoch, policy [start, mosaic/mixup stop, strong stop], lr, backbone lr, weight decay, 640's repeats
DEIM_S = (132, 64, (4, 64, 120), 4e-4, 2e-4, 1e-4, 20)
DEIM_M = (102, 49, (4, 49, 90), 4e-4, 4e-5, 1e-4, 6)
DEIM_L = (58, 29, (4, 29, 50), 5e-4, 2.5e-5, 1.25e-4, 4)


@pytest.mark.parametrize("recipe, backbone, schedule", [
    ("dfine_mnv4_conv_s", "mobilenetv4_conv_small", DEIM_S),
    ("dfine_shufflenet_v2_x1_0", "torchvision/shufflenet_v2_x1_0", DEIM_S),
    ("dfine_mnv4_conv_m", "mobilenetv4_conv_medium", DEIM_M),
    ("dfine_mnv4_hybrid_m", "mobilenetv4_hybrid_medium", DEIM_M),
    ("dfine_repvit_m1_1", "repvit_m1_1", DEIM_M),
    ("dfine_mnv4_conv_l", "mobilenetv4_conv_large", DEIM_L),
    ("dfine_mnv4_hybrid_l", "mobilenetv4_hybrid_large", DEIM_L),
])
def test_deim_recipes_hold_dfine_s_and_deims_schedule(recipe, backbone, schedule):
    cfg, dfine_s = load_det_config([f"recipe={recipe}"]), load_det_config(["recipe=dfine_s"])
    epochs, flat, (start, mix_stop, strong_stop), lr, backbone_lr, decay, repeats = schedule
    assert cfg.model.backbone == backbone
    # D-FINE-S's detector with D-FINE's own neck, the same for every backbone; DEIM's loss
    differs = {k for k in cfg.model if k != "backbone" and cfg.model[k] != dfine_s.model[k]}
    assert differs == {"fusion_block", "downsample", "class_loss"}
    assert (cfg.model.head, cfg.model.fusion_block, cfg.model.downsample, cfg.model.class_loss) == (
        "dfine", "rep_elan", "scdown_linear", "mal")
    assert (cfg.train.epochs, cfg.train.aug_start_epoch, cfg.train.epochs - cfg.train.no_aug_epochs) == (
        epochs, start, strong_stop)
    assert (cfg.data.mosaic_prob, list(cfg.data.mosaic_epochs), cfg.data.mixup_prob, list(cfg.data.mixup_epochs)) == (
        0.5, [start, mix_stop], 0.5, [start, mix_stop])
    assert (cfg.data.mosaic_size, cfg.data.mosaic_rotation, cfg.data.mosaic_translate, list(cfg.data.mosaic_scale),
            list(cfg.data.mixup_ratio)) == (320, 10, 0.1, [0.5, 1.5], [0.45, 0.55])
    assert (cfg.optim.schedule, cfg.optim.flat_epochs, cfg.optim.min_lr_ratio, cfg.optim.warmup_steps) == (
        "flat_cosine", flat, 0.5, 2000)
    assert (cfg.optim.lr, cfg.optim.backbone_lr, cfg.optim.weight_decay) == (lr, backbone_lr, decay)
    assert (cfg.data.global_batch_size, cfg.train.ema_warmups, cfg.train.ema_decay) == (32, 1000, 0.9999)
    sides = list(cfg.data.multiscale)
    assert sides == [480, 512, 544, 576, 608] + [640] * repeats + [672, 704, 736, 768, 800]


@pytest.mark.parametrize("overrides, message", [
    (["model.head=dino"], r"model\.head='dino' is not one of rtdetrv2, dfine"),
    (["model.head=rtdetrv2", "model.num_points_per_level=[3,6,3]"],
     r"model\.num_points_per_level is a D-FINE setting: set model\.head=dfine"),
    (["model.num_points_per_level=[3,6]"], r"model\.num_points_per_level=\[3, 6\] needs one entry per level of "
                                           r"model\.out_strides=\[8, 16, 32\]"),
    (["model.reg_max=15"], r"model\.head=dfine needs an even model\.reg_max of at least 4 \(D-FINE: 32\), got 15"),
    (["model.class_loss=focal"], r"model\.class_loss='focal' is not one of vfl, mal"),
])
def test_unsupported_head_settings_stop_at_load_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_det_config(["recipe=det_demo_dfine", *overrides])
    assert "\n" not in str(error.value)


def test_unsupported_head_settings_are_refused_when_built_from_code():
    with pytest.raises(ValueError, match=r"^num_points_per_level=\[3, 6\] needs one entry per level"):
        build_rtdetr(rtdetr_config("test_resnet", 3, head="dfine", num_points_per_level=(3, 6), **TINY))
    with pytest.raises(ValueError, match=r"^head='dino' is not one of"):
        build_criterion(rtdetr_config("test_resnet", 3, head="dino", **TINY))


def test_conversion_to_transformers_rtdetr_refuses_the_dfine_head():
    from distill.detection.hf_convert import to_transformers

    model = build_rtdetr(rtdetr_config("test_resnet", 3, head="dfine", **TINY))
    with pytest.raises(ValueError, match="head='dfine' has no RT-DETRv2 counterpart"):
        to_transformers(model, ["a", "b", "c"])


def test_the_demo_recipes_differ_from_det_demo_in_the_head_then_in_deims_training():
    plain, dfine, deim = (load_det_config([f"recipe={r}"]) for r in ("det_demo", "det_demo_dfine", "det_demo_deim"))
    assert dfine.model.head == "dfine" and plain.model.head == "rtdetrv2"
    assert {k for k in plain.model if plain.model[k] != dfine.model[k]} == {"head", "class_loss", "fusion_block",
                                                                            "downsample"}
    assert dfine.model.class_loss == "mal" and (dfine.model.fusion_block, dfine.model.downsample) == (
        "rep_elan", "scdown_linear")  # D-FINE's neck: the run can go to transformers' D-FINE
    assert {k for k in dfine.model if dfine.model[k] != deim.model[k]} == {"fusion_block", "downsample"}

    def changed(a, b):
        return {f"{section}.{k}" for section in ("data", "optim", "train", "eval") for k in a[section]
                if a[section][k] != b[section][k]}

    assert changed(plain, dfine) == set()
    assert changed(dfine, deim) == {"data.mosaic_prob", "data.mosaic_epochs", "data.mosaic_size", "data.mixup_prob",
                                    "data.mixup_epochs", "optim.schedule", "optim.flat_epochs",
                                    "optim.min_lr_ratio", "train.steps", "train.epochs", "train.aug_start_epoch",
                                    "train.no_aug_epochs"}
    # the same 1200 steps: 12 epochs of 800 images at batch 8; DEIM-D-FINE-S's epochs scaled by 12 / 132
    assert (deim.train.epochs, plain.train.steps, deim.data.batch_size) == (12, 1200, 8)
    assert (deim.train.aug_start_epoch, list(deim.data.mosaic_epochs), list(deim.data.mixup_epochs),
            deim.optim.flat_epochs, deim.train.no_aug_epochs) == (0.5, [0.5, 6], [0.5, 6], 6, 1)


def test_head_and_criterion_learn_a_fixed_batch():
    """Optimiser steps on one batch lower the D-FINE loss; eval outputs post-process into detections."""
    torch.manual_seed(0)
    model = build_rtdetr(rtdetr_config("test_resnet", 3, head="dfine", **TINY))
    criterion = build_criterion(model.cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, targets = torch.randn(2, 3, 64, 64), _targets()
    totals = []
    model.train()
    for _ in range(16):
        torch.manual_seed(1)  # the same denoising queries every step: one fixed batch
        losses = criterion(model(images, targets), targets)
        assert all(torch.isfinite(v) for v in losses.values())
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert {"loss_fgl", "loss_ddf_aux_1", "loss_vfl_pre", "loss_bbox_enc_0", "loss_fgl_dn_0"} <= set(losses)
    assert sum(totals[-4:]) / 4 < 0.85 * totals[0], totals  # 0.69-0.78 over three seeds; the matching jitters
    # the distribution heads got gradients from their own losses
    assert model.decoder.bbox_heads[0].layers[-1].weight.grad.abs().sum() > 0
    assert model.decoder.lqe_layers[0].mlp.layers[-1].weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert set(outputs) == {"pred_logits", "pred_boxes"} and outputs["pred_boxes"].shape == (2, 10, 4)
    detections = PostProcessor(5)(outputs, torch.tensor([[64, 48], [64, 64]]))
    assert detections[0]["boxes"].shape == (5, 4) and (detections[0]["boxes"][:, 2::2] <= 64 + 1e-3).all()


@pytest.mark.parametrize("boxes_per_image", [(2, 0), (0, 0)])
def test_losses_are_finite_and_reach_every_head_without_boxes(boxes_per_image):
    """A process whose batch holds no box still runs every branch (distributed training needs the same graph)."""
    torch.manual_seed(0)
    model = build_rtdetr(rtdetr_config("test_resnet", 3, head="dfine", **TINY)).train()
    targets = [{"labels": torch.ones(n, dtype=torch.long),
                "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]] * n).reshape(-1, 4)} for n in boxes_per_image]
    losses = build_criterion(model.cfg)(model(torch.randn(2, 3, 64, 64), targets), targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert {"loss_fgl", "loss_ddf_aux_0", "loss_fgl_dn_0", "loss_vfl_dn_pre"} <= set(losses)
    sum(losses.values()).backward()
    decoder = model.decoder
    for head in (decoder.bbox_heads[0], decoder.pre_bbox_head, decoder.lqe_layers[0], decoder.score_heads[1]):
        assert all(p.grad is not None for p in head.parameters())


def test_fine_tuning_with_the_dfine_head_runs_end_to_end(tmp_path):
    from accelerate.state import AcceleratorState

    from distill.finetune_det import main

    generate_coco_shapes(tmp_path / "shapes", num_train=8, num_val=4, img_size=96, num_classes=3, max_objects=3,
                         seed=1)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        # DEIM's training squeezed into 3 steps (2 an epoch): every sample a mosaic and every batch mixed up
        # in the first epoch, the flat-then-cosine LR
        deim = ["train.epochs=1.5", "train.aug_start_epoch=0", "train.no_aug_epochs=0.5", "data.mosaic_prob=1",
                "data.mosaic_epochs=[0,1]", "data.mixup_prob=1", "data.mixup_epochs=[0,1]", "optim.flat_epochs=0.5",
                "optim.warmup_steps=1", "data.mosaic_size=48"]
        summary = main(["recipe=det_demo_deim", f"data.root={tmp_path / 'shapes'}", "data.generate=null",
                        f"output_dir={tmp_path / 'run'}", *deim, "model.backbone=test_efficientnet",
                        "model.hidden_dim=32", "model.dim_feedforward=64", "model.num_heads=2",
                        "model.num_decoder_layers=2", "model.num_queries=20", "data.img_size=96",
                        "data.batch_size=4", "data.num_workers=0", "eval.visualize=0", "train.trackers=[jsonl]",
                        "train.log_every=1"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    run = tmp_path / "run"
    written = json.loads((run / "summary.json").read_text())
    assert written["steps"] == 3 and written["config"]["model"]["head"] == "dfine"
    assert all(isinstance(written[k], float) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in logged if "loss_fgl" in m]
    assert len(trained) == 3 and all(m["loss_ddf_aux_0"] >= 0 and "loss_mal" in m for m in trained)
    # logged after each step, the LR of the next: flat through step 1, the cosine ends at step 2 (where the
    # augmentations stop) at half the peak, flat from there
    assert [m["lr"] for m in trained] == pytest.approx([1e-3, 5e-4, 5e-4])

    # the run reads back as a D-FINE detector, also in its deploy form with fixed anchors (export, predict)
    from distill.detection.run import load_detector

    loaded = load_detector(run, img_size=0, deploy=True)
    assert isinstance(loaded.model.decoder, DFineDecoder)
    assert loaded.model.decoder.eval_shapes == [(12, 12), (6, 6), (3, 3)]
    with torch.no_grad():
        outputs = loaded.model(torch.randn(1, 3, 96, 96))
    assert outputs["pred_logits"].shape == (1, 20, 3) and torch.isfinite(outputs["pred_boxes"]).all()
