"""Backbones as feature extractors: strides/channels read from the models, checkpoints loaded by name."""
import pytest
import torch

from distill.engine.checkpoint import CheckpointMismatch, atomic_save
from distill.models.factory import create_model
from distill.models.features import create_feature_extractor


@pytest.mark.parametrize("name", ["mobilenetv4_conv_small_035", "repvit_m0_9", "torchvision/shufflenet_v2_x0_5",
                                  "test_byobnet"])
def test_feature_maps_match_declared_strides_and_channels(name):
    model = create_feature_extractor(name).eval()
    assert model.strides == [8, 16, 32]
    with torch.no_grad():
        maps = model(torch.rand(1, 3, 96, 128))
    assert [m.shape[1] for m in maps] == model.channels
    assert [(96 // m.shape[2], 128 // m.shape[3]) for m in maps] == [(s, s) for s in model.strides]


def test_channels_come_from_the_model():
    # MobileNetV4's stride-32 map is its last 1x1 conv block (960 wide for conv-small), before the head
    assert create_feature_extractor("mobilenetv4_conv_small_035").channels == [24, 32, 336]
    assert create_feature_extractor("torchvision/shufflenet_v2_x0_5").channels == [48, 96, 192]
    assert create_feature_extractor("test_resnet", out_strides=(16, 32)).strides == [16, 32]
    with pytest.raises(ValueError, match="stride 64"):
        create_feature_extractor("test_resnet", out_strides=(8, 64))
    with pytest.raises(ValueError, match="unknown model"):
        create_feature_extractor("no_such_backbone_xyz")


def _run_checkpoint(model, tmp_path, name="run.pt"):
    path = tmp_path / name
    atomic_save({"student": {k: torch.zeros_like(v) for k, v in model.state_dict().items()},
                 "ema": model.state_dict(), "config": {"student": {"name": "x"}}}, path)
    return str(path)


def test_timm_checkpoint_loads_into_features_by_name(tmp_path):
    x = torch.rand(2, 3, 64, 64)
    # test_byobnet: timm's feature wrapper renames `stages.0` to `stages_0`; the weights still find their way
    clf = create_model("test_byobnet", num_classes=4).eval()
    feats = create_feature_extractor("test_byobnet", checkpoint=_run_checkpoint(clf, tmp_path)).eval()
    with torch.no_grad():
        expected = clf.forward_intermediates(x, indices=[2, 3, 4], intermediates_only=True)
        for got, want in zip(feats(x), expected):
            assert torch.allclose(got, want, atol=1e-5)  # the EMA weights were loaded, not the zeroed student


def test_torchvision_checkpoint_and_plain_state_dict(tmp_path):
    clf = create_model("torchvision/shufflenet_v2_x0_5", num_classes=3).eval()
    atomic_save(clf.state_dict(), tmp_path / "plain.pt")
    feats = create_feature_extractor("torchvision/shufflenet_v2_x0_5", checkpoint=str(tmp_path / "plain.pt")).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        deepest = clf.stage4(clf.stage3(clf.stage2(clf.maxpool(clf.conv1(x)))))
        assert torch.allclose(feats(x)[-1], deepest, atol=1e-5)


def test_safetensors_folder(tmp_path):
    from safetensors.torch import save_file

    clf = create_model("test_resnet", num_classes=4).eval()
    (tmp_path / "export").mkdir()
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(tmp_path / "export" / "model.safetensors"))
    feats = create_feature_extractor("test_resnet", checkpoint=str(tmp_path / "export")).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(feats(x)[-1], clf.forward_features(x), atol=1e-5)


def test_mismatched_checkpoints_name_the_keys(tmp_path):
    wider = create_model("torchvision/shufflenet_v2_x1_0", num_classes=3)
    with pytest.raises(CheckpointMismatch, match=r"mis-shaped.*stage2"):
        create_feature_extractor("torchvision/shufflenet_v2_x0_5", checkpoint=_run_checkpoint(wider, tmp_path))
    clf = create_model("test_resnet", num_classes=4)
    state = clf.state_dict()
    del state["layer2.0.conv1.weight"]
    atomic_save(state, tmp_path / "cut.pt")
    with pytest.raises(CheckpointMismatch, match=r"missing \(1\): layer2.0.conv1.weight"):
        create_feature_extractor("test_resnet", checkpoint=str(tmp_path / "cut.pt"))
