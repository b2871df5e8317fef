"""RT-DETR fine-tuning set up as RT-DETRv2's reference trains: synchronised batch norms over processes, its EMA
warm-up, one category mapping from the training set, and a multi-scale side drawn by each process."""
import json
import math

import pytest
import torch
from timm.layers import BatchNormAct2d, SyncBatchNormAct

from distill.data.coco import CocoDetection, CocoFormatError, DetectionBatchSampler
from distill.data.synthetic_coco import generate_coco_shapes
from distill.detection.recipe import load_det_config
from distill.detection.rtdetr import build_rtdetr, rtdetr_config

TINY = dict(hidden_dim=32, dim_feedforward=64, num_queries=20, num_decoder_layers=1, num_heads=2, num_points=2,
            num_denoising=0)


def tiny_detector(backbone="mobilenetv4_conv_small_035"):
    torch.manual_seed(0)
    return build_rtdetr(rtdetr_config(backbone, 3, **TINY))


def test_sync_batchnorm_on_several_gpus_keeps_activations_and_a_plain_ema():
    from distill.detection.ema import RTDETREma
    from distill.detection.sync_bn import to_sync_batchnorm

    model = tiny_detector()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    fused = sum(isinstance(m, BatchNormAct2d) for m in norms)
    assert fused > 10 and len(norms) > fused  # timm's norm + act layers and the neck's plain ones
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        want = model.eval()(x)["pred_logits"]
    ema = RTDETREma(model, 0.9999, 2000)  # taken before the conversion, as fine-tuning does

    # conversion needs no GPU; the converted model runs on one (CUDA synchronises across processes)
    synced = to_sync_batchnorm(model, world_size=2, device=torch.device("cuda"))
    kinds = [type(m) for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(kinds) == len(norms) and all(issubclass(k, torch.nn.SyncBatchNorm) for k in kinds)
    assert sum(k is SyncBatchNormAct for k in kinds) == fused  # the activation goes along
    with torch.no_grad():  # in eval mode a synchronised norm normalises with its running statistics
        assert torch.allclose(synced.eval()(x)["pred_logits"], want, atol=1e-6)

    # the EMA and the checkpointed weights are plain: they load into a freshly built detector
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in ema.module.modules())
    ema.update(synced, step=0)
    tiny_detector().load_state_dict(synced.state_dict())
    tiny_detector().load_state_dict(ema.module.state_dict())

    # one process, or processes on CPUs (gloo cannot synchronise batch norms): left as it is
    assert to_sync_batchnorm(model, 1, torch.device("cuda")) is model
    assert to_sync_batchnorm(model, 2, torch.device("cpu")) is model
    assert to_sync_batchnorm(model, 2, torch.device("cuda"), enabled=False) is model
    assert load_det_config(["recipe=rtdetr_base"]).train.sync_bn is True


def test_ema_warms_up_as_the_reference():
    """decay_t = 0.9999 (1 - exp(-t / 2000)) for the t-th update, EMA = d x EMA + (1 - d) x weights."""
    from distill.detection.ema import RTDETREma

    cfg = load_det_config(["recipe=rtdetr_base"]).train
    assert (cfg.ema_decay, cfg.ema_warmups) == (0.9999, 2000)
    model = torch.nn.Linear(3, 2)
    ema = RTDETREma(model, cfg.ema_decay, cfg.ema_warmups)
    for step in (0, 1, 999, 1999, 6529, 100_000):
        assert ema.get_decay(step) == pytest.approx(0.9999 * (1 - math.exp(-(step + 1) / 2000)), rel=1e-12)
    # after 72 COCO epochs (~530k steps at batch 16) an averaging window of 10,000 steps (timm's ramp: 6,530)
    assert 1 / (1 - ema.get_decay(530_000)) == pytest.approx(10_000, rel=1e-3)

    reference = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, step=step)
        d = 0.9999 * (1 - math.exp(-(step + 1) / 2000))
        reference = {k: d * reference[k] + (1 - d) * v for k, v in model.state_dict().items()}
    for k, v in ema.module.state_dict().items():
        assert torch.allclose(v, reference[k], atol=1e-6), k


def _rewrite(ann_file, categories):
    data = json.loads(ann_file.read_text())
    used = {c["id"] for c in categories}
    data["categories"] = categories
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in used]
    ann_file.write_text(json.dumps(data))


@pytest.fixture()
def shapes(tmp_path):
    generate_coco_shapes(tmp_path / "shapes", num_train=8, num_val=6, img_size=96, num_classes=3, max_objects=4, seed=1)
    return tmp_path / "shapes"


def test_validation_labels_come_from_the_training_mapping(shapes):
    train = CocoDetection(shapes / "train/images", shapes / "train/annotations.json", True, 96)
    assert train.class_names == ["circle", "square", "triangle"]
    # a validation file that lists (and uses) only two of the three categories
    val_ann = shapes / "val/annotations.json"
    _rewrite(val_ann, [c for c in train.categories if c["id"] != 2])
    val = CocoDetection(shapes / "val/images", val_ann, False, 96, categories=train.categories)
    assert val.category_ids == train.category_ids == [1, 2, 3]
    labels = torch.cat([val[i]["target"]["labels"] for i in range(len(val))])
    assert set(labels.tolist()) == {0, 2}  # category 3 is label 2, as in training

    # a validation file whose categories contradict training's: refused, naming both
    _rewrite(val_ann, [{"id": 1, "name": "circle"}, {"id": 3, "name": "star"}, {"id": 9, "name": "hexagon"}])
    with pytest.raises(CocoFormatError, match=r"annotations\.json.*id 9 \('hexagon'\) is not a training category.*"
                                              r"id 3 is 'star' here but 'triangle' in training"):
        CocoDetection(shapes / "val/images", val_ann, False, 96, categories=train.categories)


def test_fine_tuning_scores_predictions_in_training_ids(shapes, tmp_path):
    """End to end: with a validation file that lists fewer categories, predictions keep training's ids."""
    from accelerate.state import AcceleratorState

    from distill.finetune_det import main

    _rewrite(shapes / "val/annotations.json", [{"id": 1, "name": "circle"}, {"id": 3, "name": "triangle"}])
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        s = main(["recipe=det_demo", f"data.root={shapes}", "data.generate=null", f"output_dir={tmp_path / 'run'}",
                  "train.steps=2", "model.backbone=test_efficientnet", "model.hidden_dim=32", "model.dim_feedforward=64",
                  "model.num_heads=2", "model.num_decoder_layers=1", "model.num_queries=20", "data.img_size=96",
                  "data.batch_size=4", "data.num_workers=0", "eval.visualize=0", "train.trackers=[jsonl]"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert s["steps"] == 2
    run = tmp_path / "run"
    detections = json.loads((run / "predictions.json").read_text())
    assert detections and {d["category_id"] for d in detections} == {1, 2, 3}
    assert json.loads((run / "categories.json").read_text()) == [
        {"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]


def test_each_process_draws_its_own_side_for_the_same_images():
    sizes = [64, 96, 128, 160]
    ranks = [list(DetectionBatchSampler(64, 2, sizes, 30, seed=0, strong_until=20, rank=r, world_size=2))
             for r in range(2)]
    differ = 0
    for b0, b1 in zip(*ranks):
        assert not {r.index for r in b0} & {r.index for r in b1}  # one global batch, split
        differ += b0[0].size != b1[0].size
        assert len({r.size for r in b0}) == 1
    assert differ >= 5  # per process, not per step
    assert all(b[0].size == 160 for rank in ranks for b in rank[20:])  # the final side after strong_until
    again = list(DetectionBatchSampler(64, 2, sizes, 30, seed=0, strong_until=20, rank=1, world_size=2))
    assert [[(r.index, r.size, r.seed) for r in b] for b in again] == [[(r.index, r.size, r.seed) for r in b]
                                                                       for b in ranks[1]]
