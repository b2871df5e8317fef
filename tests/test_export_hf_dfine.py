"""The D-FINE head in and out of the other layouts users hold its weights in:
- out to transformers (`--to hf-dfine`): a folder transformers loads alone as D-FINE, with the same logits and
  boxes as this project's model and the same detections as the run's ONNX export; each head refuses the other
  head's target;
- in (`model.init_from`): official D-FINE / DEIM `.pth` weights and transformers D-FINE folders load with equal
  outputs; weights of the other head and other distribution bins (`reg_max`) are refused.
"""
import copy
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from distill.detection.dfine_layout import layout_keys  # noqa: E402
from distill.detection.rtdetr import RTDETRConfig, build_rtdetr  # noqa: E402
from distill.engine.checkpoint import CheckpointMismatch, atomic_save, checkpoint_path  # noqa: E402
from detections import as_arrays, assert_same_detections, assert_same_queries  # noqa: E402
from test_det_handoff import CATEGORIES, SIDE, dfine_run, randomise, run_export  # noqa: E402, F401 (a fixture)

BACKBONE = "mobilenetv4_conv_small_035"
# D-FINE's own neck (rep_elan, scdown_linear) at width 32, two decoder layers, 16 + 1 bins per edge
MODEL = dict(backbone=BACKBONE, num_classes=3, hidden_dim=32, expansion=0.5, num_queries=20, num_decoder_layers=2,
             num_heads=2, num_points=2, num_points_per_level=[3, 2, 2], dim_feedforward=64, fusion_block="rep_elan",
             downsample="scdown_linear", encoder_attention="aifi", num_denoising=10, out_strides=[8, 16, 32],
             depth_mult=0.34, head="dfine", reg_max=16, reg_scale=4.0)
INPUTS = [torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1)),
          torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))]


def build(**changes):
    return build_rtdetr(RTDETRConfig(**{**MODEL, "out_strides": (8, 16, 32), **changes}))


def outputs(model, x) -> dict:
    """Logits and boxes of our detector or of a transformers one, in eval mode."""
    with torch.no_grad():
        if isinstance(model, transformers.PreTrainedModel):
            out = model.eval()(pixel_values=x)
            return {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}
        return model.eval()(x)


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in ("pred_logits", "pred_boxes"))


@pytest.fixture(scope="module")
def dfine():
    torch.manual_seed(0)
    return randomise(build()).eval()


def save_run(folder, model, model_cfg):
    state = model.state_dict()
    config = {"recipe": "tiny", "model": model_cfg, "data": {"img_size": 96}, "eval": {"num_top": 20}}
    atomic_save({"model": state, "ema": state, "optimizer": {}, "progress": [{"step": 1}], "config": config},
                checkpoint_path(folder, 1))
    (folder / "categories.json").write_text(json.dumps(CATEGORIES))
    return folder


# ----------------------------------------------------------------------------------------------- out


def test_hf_dfine_export_reloads_as_dfine_with_equal_outputs(dfine, tmp_path):
    from distill.detection.hf_convert import from_transformers

    run = save_run(tmp_path / "run", dfine, MODEL)
    run_export(run, "--to", "hf-dfine", "--out", tmp_path / "hf")
    hf = transformers.AutoModelForObjectDetection.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.model_type == "d_fine" and type(hf).__name__ == "DFineForObjectDetection"
    assert hf.config.max_num_bins == 16 and list(hf.config.decoder_n_points) == [3, 2, 2]
    assert hf.config.id2label == {0: "circle", 1: "square", 2: "star"}
    card = json.loads((tmp_path / "hf" / "distill.json").read_text())
    assert card["format"] == "hf-dfine-detector" and card["check"]["max_abs_difference"] < 1e-4
    back, names = from_transformers(tmp_path / "hf")  # read back into this project, as distill.predict does
    assert names == ["circle", "square", "star"] and back.cfg.fusion_block == "rep_elan"
    for x in INPUTS:
        assert_same_queries(outputs(hf, x), outputs(dfine, x))  # float32: neighbours in either order
        assert max_difference(outputs(dfine, x), outputs(back, x)) < 1e-5  # the same code and weights
    # past the decoder's proposal selection in float64: the same proposals in the same order on any CPU
    dfine64, hf64 = copy.deepcopy(dfine).double(), hf.double()
    for x in INPUTS:
        want, got = outputs(dfine64, x.double()), outputs(hf64, x.double())
        assert (got["pred_logits"] - want["pred_logits"]).abs().max() <= 1e-6 * want["pred_logits"].abs().max()
        assert (got["pred_boxes"] - want["pred_boxes"]).abs().max() <= 1e-6  # fractions of the image


def test_hf_dfine_folder_detects_as_the_onnx_export(dfine_run, tmp_path):
    """The acceptance check of the D-FINE hand-off: one saved run exported `--to hf-dfine` (loaded by
    transformers alone: `AutoModelForObjectDetection`, `AutoImageProcessor`) and `--to onnx` (run in
    onnxruntime) gives the same detections on the same image files.

    Inputs: ONNX takes the images as `distill.predict` feeds it (resized to the run's side, antialiased
    bilinear, RGB in [0, 1]; normalised inside the graph); the transformers model takes its image processor's
    `pixel_values` of the same files, checked equal to that normalised input (1e-5). Post-processing:
    transformers' `post_process_object_detection` on the transformers logits and boxes (sigmoid, top K over
    queries x classes with K = the query count, cxcywh to xyxy scaled to each image's (height, width)), with a
    threshold of 0 so that all K stay; the ONNX graph ends in this project's post-processor, the same top K
    (the run's eval.num_top, here the query count) in the same pixels. Compared, rank by rank: scores (1e-4),
    labels (equal) and boxes divided by the image's width and height (1e-4 of the image), as sets: detections
    whose scores tie within rounding may come in either order, and one at the cut may be swapped for another
    scoring as high."""
    ort = pytest.importorskip("onnxruntime")
    from PIL import Image

    from distill.predict import ImageFiles

    run_export(dfine_run / "run", "--to", "hf-dfine", "--out", tmp_path / "hf")
    run_export(dfine_run / "run", "--to", "onnx", "--out", tmp_path / "onnx")
    hf = transformers.AutoModelForObjectDetection.from_pretrained(str(tmp_path / "hf")).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert type(hf).__name__ == "DFineForObjectDetection" and hf.config.num_queries == 20

    paths = sorted((dfine_run / "images").iterdir())
    files = ImageFiles(paths, SIDE)
    images = torch.stack([files[i]["image"] for i in range(len(paths))]).float() / 255
    sizes = torch.tensor([files[i]["size"] for i in range(len(paths))], dtype=torch.float32)  # (width, height)
    scores, labels, boxes = session.run(["scores", "labels", "boxes"],
                                        {"images": images.numpy(), "orig_sizes": sizes.numpy()})

    card = json.loads((tmp_path / "hf" / "distill.json").read_text())["input"]
    mean, std = (torch.tensor(card[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    inputs = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
    assert (inputs["pixel_values"] - (images - mean) / std).abs().max() < 1e-5  # the same input
    with torch.no_grad():
        theirs = processor.post_process_object_detection(hf(**inputs), threshold=0.0, target_sizes=sizes.flip(1))

    assert scores.max() > 0.5 and scores.max() - scores.min() > 0.2  # spread scores, not a degenerate model
    for i, d in enumerate(theirs):
        assert len(d["scores"]) == scores.shape[1] == 20
        side = sizes[i].repeat(2).numpy()  # (w, h, w, h): boxes as fractions of the image
        assert_same_detections(as_arrays(d["scores"], d["labels"], d["boxes"].numpy() / side),
                               as_arrays(scores[i], labels[i], boxes[i] / side), score_atol=1e-4, box_atol=1e-4,
                               num_top=20, name=str(paths[i]))


@pytest.mark.parametrize("head, target, other", [("dfine", "hf-rtdetr", "hf-dfine"),
                                                 ("rtdetrv2", "hf-dfine", "hf-rtdetr")])
def test_each_head_refuses_the_other_heads_target(tmp_path, capsys, head, target, other):
    from distill.export.__main__ import main

    changes = {} if head == "dfine" else dict(head="rtdetrv2", num_points_per_level=None, fusion_block="csp_repvgg",
                                              downsample="conv", depth_mult=1.0)
    run = save_run(tmp_path / "run", build(**changes), {**MODEL, **changes})
    with pytest.raises(SystemExit) as exit_:
        main([str(run), "--to", target, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"model.head={head}" in error and f"export it --to {other}" in error
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- in


def official_state(model, eval_side=None) -> dict:
    """`model`'s encoder and decoder as the official D-FINE code names them, with the constants it stores:
    `up` and `reg_scale` (twice each), each cross-attention's offset scales and, for a model built with an
    evaluation side, the anchors and their validity mask."""
    from distill.detection.decoder import generate_anchors

    state = {}
    for key, value in model.state_dict().items():
        if not key.startswith("backbone."):
            (target,) = layout_keys(key, "reference")
            state[target] = value.clone()
    for prefix in ("decoder.", "decoder.decoder."):
        state[prefix + "up"] = torch.tensor([0.5])
        state[prefix + "reg_scale"] = torch.tensor([model.cfg.reg_scale])
    for i, layer in enumerate(model.decoder.layers):
        state[f"decoder.decoder.layers.{i}.cross_attn.num_points_scale"] = layer.cross_attn.point_scale.flatten()
    if eval_side:
        shapes = [(eval_side // s, eval_side // s) for s in model.backbone.strides]
        state["decoder.anchors"], state["decoder.valid_mask"] = generate_anchors(shapes)
    return state


def started_from(source, path, **changes):
    """A fresh detector started from `path`, with `source`'s backbone (init_from leaves the backbone as given)."""
    torch.manual_seed(5)
    model = build(init_from=str(path), **changes)
    model.backbone.load_state_dict(source.backbone.state_dict())
    return model.eval()


def test_init_from_an_official_dfine_checkpoint(dfine, tmp_path):
    state = official_state(dfine)
    for key in ["encoder.fpn_blocks.0.cv2.0.bottlenecks.0.conv1.conv.weight", "encoder.pan_blocks.1.cv4.norm.bias",
                "encoder.downsample_convs.0.0.cv2.conv.weight", "decoder.decoder.lqe_layers.1.reg_conf.layers.0.weight",
                "decoder.pre_bbox_head.layers.2.bias", "decoder.dec_bbox_head.1.layers.2.weight"]:
        assert key in state, key
    torch.save({"model": {}, "ema": {"module": state, "updates": 9}, "last_epoch": 71}, tmp_path / "dfine.pth")
    model = started_from(dfine, tmp_path / "dfine.pth")
    report = model.init_report
    assert report.layout == "reference" and not report.skipped and not report.reinitialised
    assert len(report.loaded) == len([k for k in dfine.state_dict() if not k.startswith("backbone.")])
    assert sorted(report.unused) == sorted(  # the constants, checked, not loaded
        ["decoder.decoder.reg_scale", "decoder.decoder.up", "decoder.reg_scale", "decoder.up"]
        + [f"decoder.decoder.layers.{i}.cross_attn.num_points_scale" for i in range(2)])
    for x in INPUTS:
        assert max_difference(outputs(model, x), outputs(dfine, x)) < 1e-5


def test_init_from_an_official_dfine_s_checkpoint(tmp_path):
    """D-FINE-S's size: tests/data/dfine_s_layout.json (scripts/make_dfine_s_layout.py, from the official D-FINE
    code at 4a1f73a8) holds the name and shape of every encoder and decoder tensor the official model classes
    hold at D-FINE-S's size. Our `dfine_s` preset with D-FINE's neck, on timm's HGNetv2-B0 (D-FINE-S's backbone,
    whose maps have its channels 256 / 512 / 1024), written in the official names with random weights, gives
    exactly those tensors; `model.init_from` loads it back whole, with equal outputs. The backbone is ours
    (timm's names, not the official's): not in the file, kept as given."""
    from distill.detection.rtdetr import rtdetr_config

    layout = json.loads((Path(__file__).parent / "data" / "dfine_s_layout.json").read_text())
    cfg = rtdetr_config("hgnetv2_b0", 80, preset="dfine_s", fusion_block="rep_elan", downsample="scdown_linear")
    torch.manual_seed(0)
    source = randomise(build_rtdetr(cfg)).eval()
    state = official_state(source, eval_side=layout["decoder"]["eval_spatial_size"][0])
    shapes = {k: list(v.shape) for k, v in state.items()}
    assert sorted(shapes) == sorted(layout["shapes"])  # key by key
    assert {k: v for k, v in shapes.items() if v != layout["shapes"][k]} == {}
    torch.save({"model": {}, "ema": {"module": state, "updates": 1}}, tmp_path / "dfine_s.pth")

    torch.manual_seed(5)
    model = build_rtdetr(RTDETRConfig(**{**cfg.__dict__, "init_from": str(tmp_path / "dfine_s.pth")}))
    report = model.init_report
    assert report.layout == "reference" and not report.skipped and not report.reinitialised
    assert len(report.loaded) == len(layout["shapes"]) - len(report.unused)
    assert len(report.unused) == 9 and all("scale" in k or k.endswith(("up", "anchors", "valid_mask"))
                                           for k in report.unused)  # the constants
    model.backbone.load_state_dict(source.backbone.state_dict())
    x = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    want, got = outputs(source, x), outputs(model, x)
    assert want["pred_logits"].std() > 0.1  # not a head at its zero initialisation
    assert max_difference(got, want) < 1e-5


def test_init_from_the_official_decoders_weights_reproduces_its_outputs(tmp_path):
    """tests/data/dfine_reference.pt holds a decoder's weights as the official D-FINE code saved them, and its
    outputs: wrapped as a whole official checkpoint (no encoder), they load into our decoder and reproduce them."""
    reference = torch.load(Path(__file__).parent / "data" / "dfine_reference.pt", weights_only=True)
    c = reference["config"]
    state = {f"decoder.{k}": v.float() for k, v in reference["weights"].items()}
    torch.save({"model": state}, tmp_path / "decoder.pth")
    model = build(init_from=str(tmp_path / "decoder.pth"), num_classes=c["num_classes"], hidden_dim=c["hidden_dim"],
                  num_queries=c["num_queries"], out_strides=tuple(c["strides"]),
                  num_points_per_level=c["points_per_level"], num_heads=c["num_heads"],
                  num_decoder_layers=c["num_layers"], dim_feedforward=c["dim_feedforward"],
                  num_denoising=c["num_denoising"], reg_max=c["reg_max"], reg_scale=c["reg_scale"])
    report = model.init_report
    assert report.layout == "reference" and not report.reinitialised
    assert sorted(report.loaded) == sorted(k for k in model.state_dict() if k.startswith("decoder."))
    assert set(report.skipped) == {k for k in model.state_dict() if k.startswith("encoder.")}  # not in the file
    with torch.no_grad():
        got = model.decoder.eval()(reference["feats"])
    for key, want in reference["eval_outputs"].items():
        assert (got[key] - want.float()).abs().max() < 1e-4, key


def test_init_from_a_transformers_dfine_folder(dfine, tmp_path):
    from distill.detection.hf_convert import to_transformers_dfine

    to_transformers_dfine(dfine, ["a", "b", "c"]).save_pretrained(str(tmp_path / "hf"))
    model = started_from(dfine, tmp_path / "hf")
    assert model.init_report.layout == "transformers" and not model.init_report.skipped
    for x in INPUTS:
        assert max_difference(outputs(model, x), outputs(dfine, x)) < 1e-5

    # another neck and class count: what fits loads, the rest is reported
    other = build(init_from=str(tmp_path / "hf"), num_classes=5, fusion_block="csp_repvgg", downsample="conv")
    report = other.init_report
    assert report.reinitialised and all(k.startswith("encoder.") for k in report.skipped)
    assert any(k.startswith("encoder.top_down.") for k in report.skipped)
    assert any(k.startswith("decoder.layers.") for k in report.loaded)
    assert "skipped, freshly initialised" in report.summary()


RTDETR_CHANGES = dict(head="rtdetrv2", num_points_per_level=None, fusion_block="csp_repvgg", downsample="conv",
                      depth_mult=1.0)


def written_in(layout: str, model, path: Path) -> Path:
    """`model`'s weights as users hold them: an official `.pth`, a transformers folder or a run checkpoint of
    this project."""
    from distill.detection.hf_convert import to_transformers, to_transformers_dfine
    from distill.detection.layouts import to_layout

    if layout == "reference":
        state = (official_state(model) if model.cfg.head == "dfine"
                 else to_layout(model.state_dict(), "reference", skip=("backbone.",)))
        torch.save({"ema": {"module": state}}, path)
    elif layout == "transformers":
        convert = to_transformers_dfine if model.cfg.head == "dfine" else to_transformers
        convert(model, ["a", "b", "c"]).save_pretrained(str(path))
    else:
        atomic_save({"model": model.state_dict(), "ema": model.state_dict(), "config": {}}, path)
    return path


@pytest.mark.parametrize("layout", ["reference", "transformers", "ours"])
def test_init_from_refuses_the_other_head_and_other_bins(dfine, tmp_path, layout):
    """Weights of the other head, or with other bins or sampling points, stop the build with one line that says
    what to set."""
    rtdetr = build(**RTDETR_CHANGES)
    dfine_weights = written_in(layout, dfine, tmp_path / "dfine.pth")
    rtdetr_weights = written_in(layout, rtdetr, tmp_path / "rtdetr.pth")
    cases = [
        (dfine_weights, dict(reg_max=8), r"has reg_max=16 \(its edge distributions have 17 bins\) and the recipe "
                                         r"model\.reg_max=8: set model\.reg_max=16$"),
        (dfine_weights, dict(head="rtdetrv2", num_points_per_level=None),
         r"holds D-FINE weights and this detector has model\.head=rtdetrv2: set model\.head=dfine to start from them"),
        (rtdetr_weights, {},
         r"holds RT-DETR weights and this detector has model\.head=dfine: set model\.head=rtdetrv2 to start from them"),
    ]
    if layout != "ours":  # the official and transformers files store the offset scales that tell the split
        cases.append((dfine_weights, dict(num_points_per_level=[2, 3, 2]),  # as many points, split otherwise
                      r"samples \[3, 2, 2\] points per level and this detector \[2, 3, 2\]: "
                      r"set model\.num_points_per_level=\[3, 2, 2\]$"))
    for path, changes, message in cases:
        with pytest.raises(CheckpointMismatch, match=message) as error:
            build(init_from=str(path), **changes)
        assert str(error.value).startswith(f"model.init_from={path} ") and "\n" not in str(error.value)


def test_fine_tuning_from_the_other_heads_weights_stops_with_one_line(tmp_path, capsys):
    from accelerate.state import AcceleratorState

    from distill.data.synthetic_coco import generate_coco_shapes
    from distill.finetune_det import main

    weights = written_in("reference", build(**RTDETR_CHANGES), tmp_path / "rtdetrv2.pth")
    generate_coco_shapes(tmp_path / "data", num_train=2, num_val=1, img_size=96, num_classes=3, max_objects=2)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["recipe=det_demo_dfine", f"data.root={tmp_path / 'data'}", "data.generate=null",
                  f"output_dir={tmp_path / 'run'}", f"model.init_from={weights}", "model.hidden_dim=32",
                  "model.dim_feedforward=64", "model.num_heads=2", "model.num_decoder_layers=2", "data.img_size=96",
                  "data.batch_size=2", "data.num_workers=0", "train.steps=1", "train.trackers=[jsonl]"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: model.init_from={weights} holds RT-DETR weights and this detector has "
                      "model.head=dfine: set model.head=rtdetrv2 to start from them"]
    assert "Traceback" not in err
