"""A fine-tuned RT-DETR exported to ONNX gives in onnxruntime the detections PyTorch gives, with either decoder
head: RT-DETRv2's, or D-FINE's (its edge distributions, their integral over the weighting function and the
location-quality term traced into the graph)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from distill.data.shapes import PALETTE, draw_shape, random_background  # noqa: E402
from distill.detection.postprocess import PostProcessor  # noqa: E402
from distill.detection.rtdetr import RTDETRConfig, build_rtdetr  # noqa: E402
from distill.engine.checkpoint import atomic_save, checkpoint_path  # noqa: E402
from distill.export.__main__ import main as export_main  # noqa: E402
from detections import as_arrays, assert_same_detections as same_detections  # noqa: E402

SIDE, NUM_TOP = 96, 15
# a tiny, randomly initialised detector as the detection fine-tuning saves it (its recipe's `model` section)
MODEL = dict(backbone="mobilenetv4_conv_small_035", backbone_checkpoint=None, pretrained_backbone=False,
             num_classes=3, hidden_dim=32, expansion=0.5, num_queries=20, num_decoder_layers=2, num_heads=2,
             num_points=2, dim_feedforward=64, fusion_block="csp_repvgg", downsample="conv",
             encoder_attention="aifi", num_denoising=0, label_noise_ratio=0.5, box_noise_scale=1.0)
# the same with D-FINE's head and neck
DFINE_MODEL = {**MODEL, "head": "dfine", "fusion_block": "rep_elan", "downsample": "scdown_linear", "depth_mult": 0.34,
               "num_points_per_level": [3, 2, 2], "reg_max": 16, "reg_scale": 4.0}
MODELS = {"rtdetrv2": MODEL, "dfine": DFINE_MODEL}


def jitter(state, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() and "running_var" not in k
            else v for k, v in state.items()}


@pytest.fixture(scope="module", params=sorted(MODELS))
def det_run(request, tmp_path_factory):
    """A saved run of each head: its folder and checkpoint."""
    model_cfg = MODELS[request.param]
    folder = tmp_path_factory.mktemp(f"det_{request.param}") / "run"
    torch.manual_seed(0)
    state = jitter(build_rtdetr(RTDETRConfig(**model_cfg)).state_dict(), 0.05, 1)
    # a steeper last score head: scores apart as a trained detector's are, so that the top-K order is clear
    state[f"decoder.score_heads.{model_cfg['num_decoder_layers'] - 1}.weight"] *= 5
    ckpt = {"model": state, "ema": jitter(state, 0.05, 2), "optimizer": {}, "progress": [{"step": 7}],
            "config": {"recipe": "det_demo", "model": model_cfg, "data": {"img_size": SIDE},
                       "eval": {"num_top": NUM_TOP}}}
    atomic_save(ckpt, checkpoint_path(folder, 7))
    return folder, ckpt


def shapes_image(width, height, seed):
    """A cluttered background with a few drawn shapes (what the detection demo data look like)."""
    rng = np.random.default_rng(seed)
    image = random_background(height, width, rng)
    for i in range(3):
        centre = (float(rng.uniform(20, width - 20)), float(rng.uniform(20, height - 20)))
        draw_shape(image, ("circle", "square", "star")[i], centre, float(rng.uniform(16, 40)), PALETTE[i], 15.0 * i)
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


def model_input(sizes, seed):
    """Images resized to the export side in [0, 1] and their original (width, height)."""
    images = [shapes_image(w, h, seed + i) for i, (w, h) in enumerate(sizes)]
    batch = torch.cat([F.interpolate(im[None], size=(SIDE, SIDE), mode="bilinear", antialias=True) for im in images])
    return batch, torch.tensor(sizes, dtype=torch.float32)


def pytorch_detections(ckpt, weights, images, orig_sizes):
    """The reference: the detector as fine-tuning evaluates it (normalise, forward, post-process)."""
    model = build_rtdetr(RTDETRConfig(**ckpt["config"]["model"]))
    model.load_state_dict(ckpt[weights])
    model.eval()
    mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model((images - mean) / std)
    return [t.numpy() for t in PostProcessor(NUM_TOP).detections(out["pred_logits"], out["pred_boxes"], orig_sizes)]


def assert_same_detections(got, want, orig_sizes):
    """Image by image, as sets (scores that tie within rounding come in either order): scores to 1e-5, boxes
    to 1e-5 of the image's larger side."""
    for i, side in enumerate(orig_sizes.max(1).values.tolist()):
        same_detections(as_arrays(*(t[i] for t in got)), as_arrays(*(t[i] for t in want)), score_atol=1e-5,
                        box_atol=1e-5 * side, num_top=NUM_TOP, name=f"image {i}")


def test_onnx_detector_matches_pytorch(det_run, tmp_path):
    folder, ckpt = det_run
    export_main([str(folder), "--out", str(tmp_path / "onnx")])  # a detection run: onnx is the default

    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    card = json.loads((tmp_path / "onnx" / "distill.json").read_text())
    assert card["input"]["img_size"] == SIDE and card["num_top"] == NUM_TOP
    assert card["head"] == ckpt["config"]["model"].get("head", "rtdetrv2")

    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    for sizes in ([(160, 120)], [(160, 120), (96, 96), (300, 200)]):  # the batch axis is dynamic
        images, orig_sizes = model_input(sizes, seed=len(sizes))
        got = session.run(["scores", "labels", "boxes"], {"images": images.numpy(), "orig_sizes": orig_sizes.numpy()})
        assert got[2].shape == (len(sizes), NUM_TOP, 4)
        assert (np.diff(got[0], axis=1) <= 0).all()
        assert_same_detections(got, pytorch_detections(ckpt, "ema", images, orig_sizes), orig_sizes)


def test_onnx_entry_point_and_raw_weights(det_run, tmp_path, capsys):
    folder, ckpt = det_run
    export_main([str(folder), "--to", "onnx", "--out", str(tmp_path / "raw"), "--weights", "student", "--opset", "18"])
    assert json.loads(capsys.readouterr().out)["out"] == str(tmp_path / "raw")
    session = ort.InferenceSession(str(tmp_path / "raw" / "model.onnx"), providers=["CPUExecutionProvider"])
    images, orig_sizes = model_input([(128, 128)], seed=5)
    got = session.run(None, {"images": images.numpy(), "orig_sizes": orig_sizes.numpy()})
    assert_same_detections(got, pytorch_detections(ckpt, "model", images, orig_sizes), orig_sizes)
    # the raw weights, not the EMA ones
    assert not np.allclose(got[0], pytorch_detections(ckpt, "ema", images, orig_sizes)[0], atol=1e-4)


def test_detector_that_does_not_fit_is_refused(det_run, tmp_path, capsys):
    folder, ckpt = det_run
    other = {**ckpt, "config": {**ckpt["config"], "model": {**ckpt["config"]["model"], "num_classes": 5}}}
    atomic_save(other, checkpoint_path(tmp_path / "other", 3))
    with pytest.raises(SystemExit) as e:
        export_main([str(tmp_path / "other"), "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "mis-shaped" in err and "ckpt-00000003.pt" in err
    assert not (tmp_path / "never" / "model.onnx").exists()
