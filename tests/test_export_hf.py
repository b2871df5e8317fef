"""The distilled backbone inside Hugging Face transformers' RT-DETR: written, reloaded by transformers alone,
and reproducing the student's feature maps."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from distill.export.__main__ import main as export_main  # noqa: E402
from test_export import make_run, max_diff, reference  # noqa: E402

NAME = "mobilenetv4_conv_small_035"
# a tiny detector: the backbone is what is checked; v2 needs two decoder layers to tie its box heads
TINY = ["d_model=32", "encoder_hidden_dim=32", "encoder_ffn_dim=64", "decoder_ffn_dim=64", "num_queries=10",
        "decoder_layers=2", "encoder_attention_heads=2", "decoder_attention_heads=2", "num_denoising=0",
        "decoder_in_channels=[32, 32, 32]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder, ckpt = make_run(tmp_path_factory.mktemp("hf") / "run", NAME)
    return folder, reference(NAME, 10, ckpt["ema"])


def export(run_folder, out, *extra):
    hf_set = [a for item in TINY for a in ("--hf-set", item)]
    export_main([str(run_folder), "--out", str(out), "--to", "hf-rtdetr", "--num-labels", "3", *hf_set, *extra])
    return json.loads((out / "distill.json").read_text())


def backbone_maps(detector, x):
    with torch.no_grad():
        return detector.model.backbone.model(x).feature_maps


@pytest.mark.parametrize("arch", ["rtdetr", "rtdetr_v2"])
def test_hf_rtdetr_reloads_with_the_student_backbone(run, tmp_path, arch):
    folder, ema = run
    card = export(folder, tmp_path / arch, "--arch", arch)
    cls = {"rtdetr": transformers.RTDetrForObjectDetection, "rtdetr_v2": transformers.RTDetrV2ForObjectDetection}[arch]
    detector = cls.from_pretrained(str(tmp_path / arch)).eval()
    assert detector.config.freeze_backbone_batch_norms is False
    assert list(detector.config.encoder_in_channels) == card["features"]["channels"]

    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        want = ema.forward_intermediates(x, indices=card["features"]["out_indices"], intermediates_only=True)
        outputs = detector(pixel_values=x)
    assert max_diff(backbone_maps(detector, x), want) < 1e-5
    assert outputs.logits.shape == (2, 10, 3) and outputs.pred_boxes.shape == (2, 10, 4)

    processor = transformers.RTDetrImageProcessor.from_pretrained(str(tmp_path / arch))
    assert processor.do_normalize and list(processor.image_mean) == card["input"]["mean"]


def test_transformers_batch_norm_freezing_breaks_mobilenetv4(run, tmp_path):
    """transformers' default freezing replaces timm's norm+activation layers with plain frozen batch norms:
    the activations vanish and the maps are off by orders of magnitude. timm's own freezing keeps them."""
    folder, ema = run
    card = export(folder, tmp_path / "hf")
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        want = ema.forward_intermediates(x, indices=card["features"]["out_indices"], intermediates_only=True)
    broken = transformers.RTDetrForObjectDetection.from_pretrained(str(tmp_path / "hf"), freeze_backbone_batch_norms=True)
    scale = max(w.abs().max().item() for w in want)
    assert max_diff(backbone_maps(broken.eval(), x), want) > 0.5 * scale

    card = export(folder, tmp_path / "frozen", "--freeze-bn")
    frozen = transformers.RTDetrForObjectDetection.from_pretrained(str(tmp_path / "frozen")).eval()
    backbone = frozen.model.backbone.model
    assert backbone.config.freeze_batch_norm_2d
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    for got, ref in zip(backbone_maps(frozen, x), want):  # frozen batch norm folds eps differently: relative
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())
