"""RT-DETR in and out of the other layouts users hold weights in, and its inference forms:
- COCO-pretrained weights in (`model.init_from`): a transformers RT-DETRv2 (timm backbone) converts with equal
  outputs; official RT-DETRv2 checkpoints and transformers folders load with a report;
- the whole fine-tuned detector out to transformers (`--to hf-rtdetr`): reloaded by transformers alone, same
  logits, boxes and post-processed detections as this project's model and `distill.predict`;
- the deploy form (RepVGG fused, batch norms folded) and `python -m distill.predict`, with either head (the
  D-FINE head with D-FINE's neck: `DFINE_MODEL`).
"""
import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from distill.data.shapes import PALETTE, draw_shape, random_background  # noqa: E402
from distill.detection.postprocess import PostProcessor  # noqa: E402
from distill.detection.rtdetr import RTDETRConfig, build_rtdetr, rtdetr_config  # noqa: E402
from distill.engine.checkpoint import atomic_save, checkpoint_path  # noqa: E402
from detections import as_arrays, assert_same_detections, assert_same_queries, from_coco  # noqa: E402

BACKBONE, SIDE = "mobilenetv4_conv_small_035", 96
MODEL = dict(backbone=BACKBONE, backbone_checkpoint=None, pretrained_backbone=False, num_classes=3, hidden_dim=32,
             expansion=0.5, num_queries=20, num_decoder_layers=2, num_heads=2, num_points=2, dim_feedforward=64,
             fusion_block="csp_repvgg", downsample="conv", encoder_attention="aifi", num_denoising=10,
             label_noise_ratio=0.5, box_noise_scale=1.0, out_strides=[8, 16, 32], depth_mult=1.0, dropout=0.0)
# the same size with D-FINE's head and neck (rep_elan fusion, scdown_linear downsampling, one unit per block)
DFINE_MODEL = {**MODEL, "head": "dfine", "fusion_block": "rep_elan", "downsample": "scdown_linear", "depth_mult": 0.34,
               "num_points_per_level": [3, 2, 2], "reg_max": 16, "reg_scale": 4.0}
CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 4, "name": "square"}, {"id": 7, "name": "star"}]


def randomise(model, seed=0, attention_gain=6.0):
    """Weights far from their initialisation: batch-norm statistics and scales, jittered tensors, and a peaky
    encoder attention (so that the position embedding matters to the outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
        for name, p in model.named_parameters():
            if "norm" not in name and "bn" not in name:
                p.add_(0.03 * torch.randn(p.shape, generator=g))
        for name, p in model.named_parameters():  # queries and keys of the encoder's attention
            if ("aifi" in name or "encoder.attention" in name) and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(attention_gain)
            if name.endswith("encoder.attention.attn.in_proj_weight"):
                p[: 2 * p.shape[1]].mul_(attention_gain)
    return model


def shapes_image(width, height, seed):
    rng = np.random.default_rng(seed)
    image = random_background(height, width, rng)
    for i in range(3):
        centre = (float(rng.uniform(20, width - 20)), float(rng.uniform(20, height - 20)))
        draw_shape(image, ("circle", "square", "star")[i], centre, float(rng.uniform(16, 40)), PALETTE[i], 15.0 * i)
    return image


def spread_scores(model, side=SIDE):
    """Well spread scores, a few confident, as a trained detector gives (no near-ties that would make the top-K
    order arbitrary): a steeper last score head, shifted so that 5% of the logits are positive."""
    with torch.no_grad():
        head = model.decoder.score_heads[-1]
        head.weight.mul_(15)
        logits = model.eval()(torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(9)))["pred_logits"]
        head.bias.sub_(logits.flatten().quantile(0.95))
    return model


def save_detection_run(folder, model_cfg, seed=0):
    """A detection run folder as fine-tuning leaves it (checkpoint, categories.json), with non-trivial weights."""
    torch.manual_seed(seed)
    model = spread_scores(randomise(build_rtdetr(RTDETRConfig(**{**model_cfg, "out_strides": (8, 16, 32)}))))
    state = model.state_dict()
    config = {"recipe": "tiny", "model": model_cfg, "data": {"img_size": SIDE}, "eval": {"num_top": 20}}
    atomic_save({"model": state, "ema": state, "optimizer": {}, "progress": [{"step": 3}], "config": config},
                checkpoint_path(folder, 3))
    (folder / "categories.json").write_text(json.dumps(CATEGORIES))
    return folder


def write_images(folder):
    """Shapes images of several sizes."""
    folder.mkdir()
    for i, (w, h) in enumerate([(160, 120), (96, 96), (200, 150), (120, 160)]):
        Image.fromarray(shapes_image(w, h, i)).save(folder / f"im{i}.png")
    return folder


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    """A detection run (RT-DETRv2 head) at `root/run` and a folder of images at `root/images`."""
    root = tmp_path_factory.mktemp("handoff")
    save_detection_run(root / "run", MODEL)
    write_images(root / "images")
    return root


@pytest.fixture(scope="module")
def dfine_run(tmp_path_factory):
    """The same with D-FINE's head and neck."""
    root = tmp_path_factory.mktemp("handoff_dfine")
    save_detection_run(root / "run", DFINE_MODEL)
    write_images(root / "images")
    return root


def run_export(*args):
    from distill.export.__main__ import main

    assert main([str(a) for a in args]) == 0


# ----------------------------------------------------------------------------------------------- in


def random_hf_rtdetrv2(num_labels=3, seed=0):
    from distill.models.features import create_feature_extractor

    backbone = create_feature_extractor(BACKBONE)
    config = transformers.RTDetrV2Config(
        backbone_config=transformers.TimmBackboneConfig(backbone=BACKBONE, out_indices=list(
            backbone.feature_info.out_indices), features_only=True, use_pretrained_backbone=False),
        freeze_backbone_batch_norms=False, encoder_in_channels=backbone.channels, feat_strides=backbone.strides,
        d_model=32, encoder_hidden_dim=32, hidden_expansion=0.5, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, decoder_layers=2, num_queries=20, decoder_n_points=2,
        num_denoising=10, decoder_in_channels=[32, 32, 32], num_labels=num_labels)
    torch.manual_seed(seed)
    return randomise(transformers.RTDetrV2ForObjectDetection(config).eval(), seed)


def test_a_transformers_rtdetrv2_converts_with_equal_outputs():
    """In float32 up to the decoder's proposal selection; past it in float64, where the two models' outputs
    agree to 1e-8 of their scale (transformers keeps float32 anchors), far below any gap between two proposals'
    scores: the same proposals in the same order on any CPU (in float32 a near-tie can order them either way)."""
    from distill.detection.hf_convert import from_transformers

    hf = random_hf_rtdetrv2()
    ours, names = from_transformers(hf)
    assert names == ["LABEL_0", "LABEL_1", "LABEL_2"]
    x = torch.rand(2, 3, 128, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(pixel_values=x), ours(x)
        maps = ours.encoder(ours.backbone(x))
        coarse = ours.encoder.input_proj[-1](ours.backbone(x)[-1])  # what the attention layer (AIFI) sees
        aifi, hf_aifi = ours.encoder.attention(coarse), hf.model.encoder.aifi[0](coarse)
    assert want.logits.std() > 0.1 and (want.logits[0] - want.logits[1]).abs().max() > 1e-2  # not degenerate
    assert (aifi - hf_aifi).abs().max() < 1e-4 * hf_aifi.abs().max()  # where the position embedding acts
    for a, b in zip(maps, want.encoder_last_hidden_state):
        assert (a - b).abs().max() < 1e-4 * b.abs().max()
    assert_same_queries(got, {"pred_logits": want.logits, "pred_boxes": want.pred_boxes})
    with torch.no_grad():
        want, got = hf.double()(pixel_values=x.double()), ours.double()(x.double())
    assert (got["pred_logits"] - want.logits).abs().max() <= 1e-6 * want.logits.abs().max()
    assert (got["pred_boxes"] - want.pred_boxes).abs().max() <= 1e-6  # boxes: fractions of the image


def test_init_from_transformers_folder_and_reference_checkpoint(tmp_path):
    from distill.detection.hf_convert import from_transformers
    from distill.detection.layouts import to_layout

    hf = random_hf_rtdetrv2(num_labels=3)
    hf.save_pretrained(str(tmp_path / "hf"))
    source, _ = from_transformers(hf)

    # a transformers folder into a 5-class detector on another backbone: encoder and decoder where they fit
    cfg = rtdetr_config("test_efficientnet", 5, hidden_dim=32, expansion=0.5, dim_feedforward=64, num_heads=2,
                        num_decoder_layers=2, num_queries=20, num_points=2, num_denoising=10)
    torch.manual_seed(3)
    fresh = build_rtdetr(cfg).state_dict()
    torch.manual_seed(3)
    model = build_rtdetr(RTDETRConfig(**{**cfg.__dict__, "init_from": str(tmp_path / "hf")}))
    report = model.init_report
    state = model.state_dict()
    assert report.layout == "transformers" and len(report.loaded) > 100
    assert sorted(report.reinitialised) == sorted(k for k in state if k.startswith(
        ("decoder.enc_score_head.", "decoder.score_heads.", "decoder.denoising_class_embed.")))
    assert set(report.skipped) == {k for k in state if k.startswith("encoder.input_proj.") and k.endswith("0.weight")}
    assert report.kept == [k for k in state if k.startswith("backbone.")]
    for key in report.loaded:
        assert torch.equal(state[key], source.state_dict()[key]), key
    for key in report.kept + report.reinitialised + list(report.skipped):
        assert torch.equal(state[key], fresh[key]), key  # left as built
    assert "re-initialised (class count differs)" in report.summary() and "unused from the source" in report.summary()

    # an official RT-DETRv2 checkpoint: {"ema": {"module": ...}} in the reference's module names
    reference = to_layout(source.state_dict(), "reference", skip=("backbone.",))
    for key in ["encoder.input_proj.0.conv.weight", "encoder.encoder.0.layers.0.self_attn.in_proj_weight",
                "encoder.encoder.0.layers.0.linear1.weight", "encoder.fpn_blocks.0.bottlenecks.0.conv1.conv.weight",
                "encoder.pan_blocks.1.conv3.norm.running_var", "decoder.input_proj.2.norm.weight",
                "decoder.enc_output.proj.weight", "decoder.decoder.layers.1.cross_attn.sampling_offsets.bias",
                "decoder.decoder.layers.0.norm3.weight", "decoder.dec_score_head.1.bias",
                "decoder.dec_bbox_head.0.layers.2.weight"]:
        assert key in reference, key
    assert reference["encoder.fpn_blocks.0.bottlenecks.0.conv1.conv.weight"].shape[-1] == 3  # the 3x3 branch
    torch.save({"ema": {"module": reference, "updates": 7}, "model": {}, "last_epoch": 71}, tmp_path / "official.pth")
    model = build_rtdetr(RTDETRConfig(**{**source.cfg.__dict__, "init_from": str(tmp_path / "official.pth")}))
    assert model.init_report.layout == "reference" and not model.init_report.skipped
    model.backbone.load_state_dict(source.backbone.state_dict())  # the backbone is the user's own
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x)["pred_logits"], source(x)["pred_logits"], atol=1e-5)


def test_init_from_in_a_fine_tuning_run(tmp_path):
    from accelerate.state import AcceleratorState

    from distill.data.synthetic_coco import generate_coco_shapes
    from distill.finetune_det import main

    hf = random_hf_rtdetrv2(num_labels=2)
    hf.save_pretrained(str(tmp_path / "hf"))
    generate_coco_shapes(tmp_path / "data", num_train=4, num_val=2, img_size=96, num_classes=3, max_objects=2)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        main(["recipe=det_demo", f"data.root={tmp_path / 'data'}", "data.generate=null",
              f"output_dir={tmp_path / 'run'}",
              f"model.init_from={tmp_path / 'hf'}", f"model.backbone={BACKBONE}", "model.hidden_dim=32",
              "model.dim_feedforward=64", "model.num_heads=2", "model.num_decoder_layers=2", "model.num_queries=20",
              "model.num_points=2", "model.num_denoising=10", "data.img_size=96", "data.batch_size=4",
              "data.num_workers=0", "train.steps=1", "eval.visualize=0", "train.trackers=[jsonl]"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    report = json.loads((tmp_path / "run" / "init_from.json").read_text())
    assert report["layout"] == "transformers" and len(report["loaded"]) > 100
    assert report["reinitialised"] and not report["skipped"]  # 2 classes there, 3 here


# ----------------------------------------------------------------------------------------------- out


def our_detections(model, images, sizes, num_top, threshold):
    """This project's evaluation path: resize as evaluation does, normalise, forward, top-K."""
    from distill.data.coco import apply_transform, detection_transform, to_model_input

    batch = torch.stack([apply_transform(detection_transform(SIDE, False, False), im, np.zeros((0, 4)),
                                         np.zeros(0))[0] for im in images])
    with torch.no_grad():
        out = model.eval()(to_model_input(batch, model.mean, model.std))
    scores, labels, boxes = PostProcessor(num_top).detections(out["pred_logits"], out["pred_boxes"], sizes)
    return to_model_input(batch, model.mean, model.std), out, [
        {"scores": s[s > threshold], "labels": lab[s > threshold], "boxes": b[s > threshold]}
        for s, lab, b in zip(scores, labels, boxes)]


def test_detection_run_exports_whole_to_transformers(det_run, tmp_path):
    from distill.detection.run import load_detector
    from distill.predict import main as predict_main

    run_export(det_run / "run", "--to", "hf-rtdetr", "--out", tmp_path / "hf")
    hf = transformers.RTDetrV2ForObjectDetection.from_pretrained(str(tmp_path / "hf")).eval()
    processor = transformers.RTDetrImageProcessor.from_pretrained(str(tmp_path / "hf"))
    assert hf.config.id2label == {0: "circle", 1: "square", 2: "star"}
    card = json.loads((tmp_path / "hf" / "distill.json").read_text())
    assert card["categories"] == CATEGORIES and card["check"]["max_abs_difference"] < 1e-4

    images = [np.array(Image.open(p).convert("RGB")) for p in sorted((det_run / "images").iterdir())]
    sizes = torch.tensor([[im.shape[1], im.shape[0]] for im in images], dtype=torch.float32)
    model = load_detector(det_run / "run").model
    pixels, outputs, ours = our_detections(model, images, sizes, num_top=20, threshold=0.25)
    inputs = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
    assert (inputs["pixel_values"] - pixels).abs().max() < 1e-5  # the same resize and normalisation
    with torch.no_grad():
        theirs = hf(**inputs)
    assert_same_queries(outputs, {"pred_logits": theirs.logits, "pred_boxes": theirs.pred_boxes})

    # past the decoder's proposal selection in float64 (the same proposals in the same order on any CPU): equal
    # logits and boxes (1e-6 of their scale), the same detections (scores 1e-5, boxes 1e-5 of the image)
    with torch.no_grad():
        theirs, outputs = hf.double()(pixel_values=pixels.double()), model.double()(pixels.double())
    assert (theirs.logits - outputs["pred_logits"]).abs().max() <= 1e-6 * outputs["pred_logits"].abs().max()
    assert (theirs.pred_boxes - outputs["pred_boxes"]).abs().max() <= 1e-6
    detections = processor.post_process_object_detection(theirs, threshold=0.25, target_sizes=sizes.flip(1))
    assert sum(len(d["scores"]) for d in detections) >= 4
    mine = PostProcessor(20).detections(outputs["pred_logits"], outputs["pred_boxes"], sizes)
    for i, (a, (s, labels, boxes)) in enumerate(zip(detections, zip(*mine))):
        assert_same_detections(as_arrays(a["scores"], a["labels"], a["boxes"]),
                               as_arrays(s[s > 0.25], labels[s > 0.25], boxes[s > 0.25]), score_atol=1e-5,
                               box_atol=1e-5 * float(sizes[i].max()), threshold=0.25, num_top=20, name=f"image {i}")

    # ... and `distill.predict` writes this project's evaluation path's detections (rounded: boxes to 0.01 px,
    # scores to 1e-5)
    predict_main([str(det_run / "run"), str(det_run / "images"), "--out", str(tmp_path / "pred"), "--threshold",
                  "0.25", "--no-draw", "--num-workers", "0"])
    written = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    ids = [c["id"] for c in CATEGORIES]
    for image, d in zip(written["images"], ours):
        assert_same_detections(from_coco(written["annotations"], image["id"], ids),
                               as_arrays(d["scores"], d["labels"], d["boxes"]), score_atol=1e-4, box_atol=0.02,
                               threshold=0.25, num_top=20, name=image["file_name"])


def test_hf_export_refuses_a_detector_transformers_cannot_hold(tmp_path, capsys):
    model = {**MODEL, "backbone": "torchvision/shufflenet_v2_x0_5", "fusion_block": "uib"}
    torch.manual_seed(0)
    state = build_rtdetr(RTDETRConfig(**{**model, "out_strides": (8, 16, 32)})).state_dict()
    atomic_save({"model": state, "ema": state, "config": {"model": model, "data": {"img_size": SIDE}}},
                checkpoint_path(tmp_path / "run", 1))
    with pytest.raises(SystemExit) as e:
        run_export(tmp_path / "run", "--to", "hf-rtdetr", "--out", tmp_path / "hf")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "model.fusion_block='uib'" in err and "timm backbones only" in err
    assert not (tmp_path / "hf").exists()


DFINE_SWAPS = {k: DFINE_MODEL[k] for k in ("head", "fusion_block", "downsample", "depth_mult", "num_points_per_level",
                                           "reg_max")}


@pytest.mark.parametrize("backbone,swaps", [("mobilenetv4_conv_small_035", {}), ("repvit_m0_9", {}),
                                            ("torchvision/shufflenet_v2_x0_5", {}),
                                            ("test_efficientnet", {"fusion_block": "uib", "encoder_attention": "psa",
                                                                   "downsample": "scdown"}),
                                            ("mobilenetv4_conv_small_035", DFINE_SWAPS),
                                            ("repvit_m0_9", DFINE_SWAPS)])
def test_deploy_form_folds_every_batch_norm_and_keeps_outputs(backbone, swaps):
    """The fold is exact: in float64 the deploy form's outputs equal the training form's to rounding (1e-16 of
    their scale). The float32 outputs are not compared: the decoder keeps the top-K of the encoder's proposals,
    and on randomised weights two proposals can score within float32 rounding of each other, so which of them
    comes first depends on the CPU's kernels (an AMD EPYC swapped two queries of RepViT with D-FINE's head where
    an Intel CPU did not). In float32, `deploy_form` itself checks the decoder's input, before any selection."""
    from distill.detection.blocks import RepVGGUnit
    from distill.detection.deploy import deploy_form

    torch.manual_seed(0)
    config = RTDETRConfig(**{**MODEL, "backbone": backbone, "out_strides": (8, 16, 32), **swaps})
    model = randomise(build_rtdetr(config)).eval()
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    deploy_form(copy.deepcopy(model))  # float32: raises if the decoder's input moved beyond 1e-4 of its scale
    model = model.double()
    with torch.no_grad():
        want = model(x.double())
        deploy_form(model)
        got = model(x.double())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    units = [u for u in model.modules() if isinstance(u, RepVGGUnit)]
    assert all(u.fused is not None for u in units)
    assert units or config.fusion_block not in ("csp_repvgg", "rep_elan")  # both fusion blocks are made of them
    for key in ("pred_logits", "pred_boxes"):
        scale = want[key].abs().max()
        assert (got[key] - want[key]).abs().max() <= 1e-9 * scale, key


# ----------------------------------------------------------------------------------------------- predict


def test_predict_writes_coco_predictions_and_pictures(det_run, tmp_path, capsys):
    from faster_coco_eval import COCO

    from distill.predict import main as predict_main

    images = tmp_path / "images"
    shutil.copytree(det_run / "images", images)
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    result = predict_main([str(det_run / "run"), str(images), "--out", str(tmp_path / "out"), "--threshold", "0.2",
                           "--batch-size", "2", "--num-workers", "0"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"images": 4, "detections": len(result["annotations"]), "skipped": 1,
                       "out": str(tmp_path / "out" / "predictions.json")}
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert written["categories"] == CATEGORIES and [s["file_name"] for s in written["skipped"]] == [
        str(images / "broken.jpg")]
    assert [im["file_name"] for im in written["images"]] == [str(images / f"im{i}.png") for i in range(4)]
    assert [(im["width"], im["height"]) for im in written["images"]] == [(160, 120), (96, 96), (200, 150), (120, 160)]
    annotations = written["annotations"]
    assert annotations and {a["category_id"] for a in annotations} <= {1, 4, 7}
    assert all(a["score"] >= 0.2 for a in annotations)
    by_id = {im["id"]: im for im in written["images"]}
    for a in annotations:  # boxes in the original image's pixels
        image = by_id[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert -1 <= x and x + w <= image["width"] + 1 and -1 <= y and y + h <= image["height"] + 1
    coco = COCO(written)  # a COCO file: faster-coco-eval reads it, and its annotations as results
    assert len(coco.getAnnIds()) == len(annotations) and coco.loadRes(annotations)
    drawn = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert drawn == [f"im{i}.png" for i in range(4)]
    assert Image.open(tmp_path / "out" / "images" / "im2.png").size == (200, 150)

    # a glob and a single file give the same detections for those images
    one = predict_main([str(det_run / "run"), str(det_run / "images" / "im2.png"), "--out", str(tmp_path / "one"),
                        "--threshold", "0.2", "--no-draw", "--num-workers", "0"])
    pattern = predict_main([str(det_run / "run"), str(det_run / "images" / "im[23].png"), "--out",
                            str(tmp_path / "glob"), "--threshold", "0.2", "--no-draw", "--num-workers", "0"])
    assert len(pattern["images"]) == 2 and one["annotations"]
    same = [a for a in pattern["annotations"] if a["image_id"] == 1]  # im2.png, first of the pattern's two
    ids = [c["id"] for c in CATEGORIES]
    assert_same_detections(from_coco(one["annotations"], 1, ids), from_coco(same, 1, ids), score_atol=1e-4,
                           box_atol=0.02, threshold=0.2, num_top=20)


@pytest.mark.parametrize("run_fixture, hf_target", [("det_run", "hf-rtdetr"), ("dfine_run", "hf-dfine")])
def test_predict_from_exported_folders_agrees_with_the_run(run_fixture, hf_target, request, tmp_path):
    pytest.importorskip("onnxruntime")
    from distill.predict import main as predict_main

    root = request.getfixturevalue(run_fixture)
    run_export(root / "run", "--to", hf_target, "--out", tmp_path / "hf")
    run_export(root / "run", "--to", "onnx", "--out", tmp_path / "onnx")
    found = {}
    for name, source in [("run", root / "run"), ("hf", tmp_path / "hf"), ("onnx", tmp_path / "onnx")]:
        found[name] = predict_main([str(source), str(root / "images"), "--out", str(tmp_path / name),
                                    "--threshold", "0.2", "--no-draw", "--num-workers", "0"])
    assert len(found["run"]["annotations"]) >= 4
    for name in ("hf", "onnx"):
        assert found[name]["categories"] == CATEGORIES
        assert [im["file_name"] for im in found[name]["images"]] == [im["file_name"] for im in found["run"]["images"]]
        ids = [c["id"] for c in CATEGORIES]
        for image in found["run"]["images"]:  # boxes to 0.05 px, scores to 1e-4
            assert_same_detections(from_coco(found[name]["annotations"], image["id"], ids),
                                   from_coco(found["run"]["annotations"], image["id"], ids), score_atol=1e-4,
                                   box_atol=0.05, threshold=0.2, num_top=20, name=f"{name}: {image['file_name']}")
