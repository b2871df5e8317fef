"""The D-FINE head in and out of the other layouts users hold its weights in:
- out to transformers (`--to hf-dfine`): a folder transformers loads alone as D-FINE, with the same logits and
  boxes as this project's model; each head refuses the other head's target;
- in (`model.init_from`): official D-FINE / DEIM `.pth` weights and transformers D-FINE folders load with equal
  outputs; weights of the other head and other distribution bins (`reg_max`) are refused.
"""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from distill.detection.dfine_layout import layout_keys  # noqa: E402
from distill.detection.rtdetr import RTDETRConfig, build_rtdetr  # noqa: E402
from distill.engine.checkpoint import CheckpointMismatch, atomic_save, checkpoint_path  # noqa: E402
from test_det_handoff import CATEGORIES, randomise, run_export  # noqa: E402

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
        assert max_difference(outputs(dfine, x), outputs(hf, x)) < 1e-4
        assert max_difference(outputs(dfine, x), outputs(back, x)) < 1e-5


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


def official_state(model) -> dict:
    """`model`'s encoder and decoder as the official D-FINE code names them, with the constants it stores."""
    state = {}
    for key, value in model.state_dict().items():
        if not key.startswith("backbone."):
            (target,) = layout_keys(key, "reference")
            state[target] = value.clone()
    for prefix in ("decoder.", "decoder.decoder."):
        state[prefix + "up"] = torch.tensor([0.5])
        state[prefix + "reg_scale"] = torch.tensor([model.cfg.reg_scale])
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
    assert sorted(report.unused) == ["decoder.decoder.reg_scale", "decoder.decoder.up", "decoder.reg_scale",
                                     "decoder.up"]  # the constants, checked, not loaded
    for x in INPUTS:
        assert max_difference(outputs(model, x), outputs(dfine, x)) < 1e-5


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


def test_init_from_refuses_the_other_head_and_other_bins(dfine, tmp_path):
    torch.save({"ema": {"module": official_state(dfine)}}, tmp_path / "dfine.pth")
    with pytest.raises(CheckpointMismatch, match=r"reg_max=16 .*model\.reg_max=8"):
        build(init_from=str(tmp_path / "dfine.pth"), reg_max=8)
    with pytest.raises(CheckpointMismatch, match=r"holds D-FINE weights and this detector has model\.head=rtdetrv2"):
        build(init_from=str(tmp_path / "dfine.pth"), head="rtdetrv2", num_points_per_level=None)

    from distill.detection.layouts import to_layout

    rtdetr = build(head="rtdetrv2", num_points_per_level=None, fusion_block="csp_repvgg", downsample="conv")
    reference = to_layout(rtdetr.state_dict(), "reference", skip=("backbone.",))
    torch.save({"ema": {"module": reference}}, tmp_path / "rtdetr.pth")
    with pytest.raises(CheckpointMismatch, match=r"holds RT-DETR weights and this detector has model\.head=dfine"):
        build(init_from=str(tmp_path / "rtdetr.pth"))
