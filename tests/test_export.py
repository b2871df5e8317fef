"""Exported backbones load in the libraries users use (timm, torchvision, this project's detector) and
reproduce the distilled student's outputs."""
import json

import pytest
import timm
import torch
import torchvision
import yaml
from torchvision.models.feature_extraction import create_feature_extractor as torchvision_features

from distill.detection.recipe import load_det_config
from distill.engine.checkpoint import CheckpointMismatch, atomic_save, checkpoint_path
from distill.export.__main__ import main as export_main
from distill.export.card import backbone_card
from distill.export.rtdetr_backbone import matching_recipe
from distill.export.source import load_student
from distill.models.factory import create_model
from distill.models.features import create_feature_extractor

SUMMARY = {"recipe": "demo", "steps": 12, "teacher_top1": 0.91, "student_top1": 0.52, "student_ema_top1": 0.61}


def perturbed_state(name: str, num_classes: int, seed: int) -> dict:
    """Weights no constructor produces, so a silently skipped load cannot pass."""
    torch.manual_seed(seed)
    state = create_model(name, num_classes=num_classes).state_dict()
    return {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


def make_run(folder, name="mobilenetv4_conv_small_035", num_classes=10, step=12, student=None, config_name=None):
    """A pretraining run folder as `distill.pretrain` leaves it: checkpoints, config.yaml, summary.json."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "recipe": "demo",
        "student": {"name": config_name or name, "num_classes": num_classes},
        "teacher": {"name": "test_resnet"},
        "data": {"mix": "demo", "img_size": 96, "val_crop_pct": 0.875},
    }
    ckpt = {
        "student": student if student is not None else perturbed_state(name, num_classes, 2 * step),
        "ema": perturbed_state(name, num_classes, 2 * step + 1),
        "optimizer": {}, "scheduler": {}, "progress": {"step": step}, "config": config,
    }
    atomic_save(ckpt, checkpoint_path(folder, step))
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "summary.json").write_text(json.dumps(SUMMARY))
    return folder, ckpt


def reference(name, num_classes, state):
    model = create_model(name, num_classes=num_classes)
    model.load_state_dict(state)
    return model.eval()


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_timm_folder_loads_in_timm(tmp_path, capsys):
    name = "mobilenetv4_conv_small_035"
    run, ckpt = make_run(tmp_path / "run", name)
    make_run(tmp_path / "run", name, step=5)  # an older checkpoint: the newest must be taken
    out = tmp_path / "timm"
    export_main([str(run), "--out", str(out)])
    assert json.loads(capsys.readouterr().out)["format"] == "timm"

    ema, student = reference(name, 10, ckpt["ema"]), reference(name, 10, ckpt["student"])
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    random = timm.create_model(f"local-dir:{out}").eval()
    older = reference(name, 10, torch.load(checkpoint_path(run, 5), weights_only=False)["ema"])
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(loaded(x), ema(x), atol=1e-5)
        assert not torch.allclose(loaded(x), student(x), atol=1e-3)  # the EMA weights, not the raw ones
        assert not torch.allclose(random(x), ema(x), atol=1e-3)
        assert not torch.allclose(older(x), ema(x), atol=1e-3)  # the newest checkpoint, not the older one
    assert timm.data.resolve_data_config({}, model=loaded)["input_size"] == (3, 96, 96)

    card = json.loads((out / "distill.json").read_text())
    assert json.loads((out / "config.json").read_text())["distill"] == card
    info = ema.feature_info
    assert card["features"]["strides"] == [8, 16, 32]
    assert card["features"]["channels"] == [info[i]["num_chs"] for i in card["features"]["out_indices"]]
    assert card["input"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "img_size": 96, "crop_pct": 0.875}
    prov = card["provenance"]
    assert (prov["teacher"], prov["recipe"], prov["data_mix"], prov["step"]) == ("test_resnet", "demo", "demo", 12)
    assert prov["top1"] == SUMMARY["student_ema_top1"] and prov["teacher_top1"] == SUMMARY["teacher_top1"]

    # an older checkpoint exported by file: summary.json's top-1 is not about its weights
    older_card = json.loads(json.dumps(backbone_card(load_student(checkpoint_path(run, 5)), "timm")))
    assert older_card["provenance"]["step"] == 5 and older_card["provenance"]["top1"] is None

    features = timm.create_model(f"local-dir:{out}", pretrained=True, features_only=True,
                                 out_indices=card["features"]["out_indices"]).eval()
    with torch.no_grad():
        maps = features(x)
        want = ema.forward_intermediates(x, indices=card["features"]["out_indices"], intermediates_only=True)
    assert [m.shape[1] for m in maps] == card["features"]["channels"]
    assert [96 // m.shape[-1] for m in maps] == card["features"]["strides"]
    assert max_diff(maps, want) < 1e-5


def test_torchvision_state_dict_loads_strictly(tmp_path):
    name = "torchvision/shufflenet_v2_x0_5"
    run, ckpt = make_run(tmp_path / "run", name)
    out = tmp_path / "tv"
    export_main([str(run), "--out", str(out), "--weights", "student"])  # torchvision is the default target

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    model.load_state_dict(torch.load(out / "model.pth", weights_only=True), strict=True)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference(name, 10, ckpt["student"])(x), atol=1e-5)

    card = json.loads((out / "distill.json").read_text())
    assert card["weights"] == "student" and card["provenance"]["top1"] == SUMMARY["student_top1"]
    levels = torchvision_features(model, return_nodes=card["features"]["modules"])
    with torch.no_grad():
        maps = list(levels(x).values())
    assert [m.shape[1] for m in maps] == card["features"]["channels"]
    assert [96 // m.shape[-1] for m in maps] == card["features"]["strides"] == [8, 16, 32]


@pytest.mark.parametrize("name", ["mobilenetv4_conv_small_035", "torchvision/shufflenet_v2_x0_5"])
def test_rtdetr_target_feeds_the_project_detector(tmp_path, name):
    run, ckpt = make_run(tmp_path / "run", name)
    out = tmp_path / "rtdetr"
    export_main([str(run), "--out", str(out), "--to", "rtdetr"])

    cfg = load_det_config([f"recipe={out / 'rtdetr.yaml'}"])
    assert cfg.model.backbone == name and cfg.model.backbone_checkpoint == str(out.resolve())
    extractor = create_feature_extractor(name, checkpoint=cfg.model.backbone_checkpoint).eval()
    card = json.loads((out / "distill.json").read_text())
    assert extractor.channels == card["features"]["channels"]
    ema = reference(name, 10, ckpt["ema"])
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        maps = extractor(x)
        if name.startswith("torchvision/"):
            want = list(torchvision_features(ema, return_nodes=card["features"]["modules"])(x).values())
        else:
            want = ema.forward_intermediates(x, indices=card["features"]["out_indices"], intermediates_only=True)
    assert max_diff(maps, want) < 1e-5


def test_detection_recipe_matches_the_backbone():
    assert matching_recipe("torchvision/shufflenet_v2_x1_0") == "rtdetr_shufflenet_v2_x1_0"
    assert matching_recipe("mobilenetv4_conv_small") == "rtdetr_mnv4_conv_s"
    assert matching_recipe("test_resnet") == "rtdetr_base"


def test_mismatched_checkpoints_name_the_keys(tmp_path, capsys):
    # weights of another model under this run's config
    other, _ = make_run(tmp_path / "other", "test_resnet", config_name="mobilenetv4_conv_small_035")
    with pytest.raises(CheckpointMismatch, match=r"ckpt-00000012\.pt \(ema weights\)") as e:
        load_student(other)
    assert "missing (273): blocks.0.0.bn1.bias" in str(e.value)
    assert "unexpected (" in str(e.value) and "conv1.0.weight" in str(e.value)

    # the same model with another class count
    fewer, _ = make_run(tmp_path / "fewer", "test_resnet", num_classes=5)
    ckpt = torch.load(checkpoint_path(fewer, 12), weights_only=False)
    ckpt["config"]["student"]["num_classes"] = 10
    atomic_save(ckpt, checkpoint_path(fewer, 12))
    with pytest.raises(CheckpointMismatch, match=r"mis-shaped .*fc\.weight: checkpoint \(5, .*\) vs model \(10, "):
        load_student(fewer)

    # a truncated file: the command names it and exits with status 2, no traceback
    cut = checkpoint_path(fewer, 20)
    cut.write_bytes(checkpoint_path(fewer, 12).read_bytes()[:300])
    with pytest.raises(SystemExit) as e:
        export_main([str(fewer), "--out", str(tmp_path / "never")])
    assert e.value.code == 2 and "ckpt-00000020.pt" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_plain_state_dicts_need_the_model_named(tmp_path):
    state = perturbed_state("test_resnet", 4, 3)
    atomic_save(state, tmp_path / "weights.pth")
    with pytest.raises(CheckpointMismatch, match="--model NAME --num-classes N"):
        load_student(tmp_path / "weights.pth")
    export_main([str(tmp_path / "weights.pth"), "--model", "test_resnet", "--num-classes", "4", "--out", str(tmp_path / "o")])
    loaded = timm.create_model(f"local-dir:{tmp_path / 'o'}", pretrained=True).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference("test_resnet", 4, state)(x), atol=1e-5)
    # a torchvision student has no timm folder
    run, _ = make_run(tmp_path / "tv", "torchvision/shufflenet_v2_x0_5")
    with pytest.raises(SystemExit) as e:
        export_main([str(run), "--out", str(tmp_path / "x"), "--to", "timm"])
    assert e.value.code == 2
