import pytest
import torch
import torchvision

from distill.engine.checkpoint import CheckpointMismatch, atomic_save
from distill.losses import dense_from_topk, distillation_loss, kl_divergence, soften
from distill.models.factory import create_model, input_spec, num_outputs, read_state_dict, zero_classifier
from distill.models.teacher import create_teacher


def test_timm_and_torchvision_by_name():
    m = create_model("mobilenetv4_conv_small_035", num_classes=7, drop_rate=0.3, drop_path_rate=0.1)
    assert num_outputs(m) == 7 and m(torch.rand(2, 3, 64, 64)).shape == (2, 7)
    tv = create_model("torchvision/shufflenet_v2_x0_5", num_classes=5, drop_rate=0.2)
    assert num_outputs(tv) == 5 and tv(torch.rand(2, 3, 64, 64)).shape == (2, 5)
    # dropout keeps torchvision's keys: the weights load into torchvision's own model strictly
    ref = torchvision.models.shufflenet_v2_x0_5(num_classes=5)
    ref.load_state_dict(tv.state_dict(), strict=True)
    assert input_spec(tv).mean == (0.485, 0.456, 0.406)
    with pytest.raises(ValueError, match="stochastic depth"):
        create_model("torchvision/shufflenet_v2_x0_5", num_classes=5, drop_path_rate=0.1)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("no_such_net_xyz", num_classes=3)


def test_a_classifier_trained_from_scratch_starts_with_every_class_equally_likely():
    for name in ("mobilenetv4_conv_small_035", "test_resnet", "torchvision/shufflenet_v2_x0_5"):
        model = zero_classifier(create_model(name, num_classes=10)).eval()
        with torch.no_grad():
            probs = model(torch.randn(2, 3, 64, 64)).softmax(-1)
        assert torch.allclose(probs, torch.full_like(probs, 0.1)), name


def test_checkpoint_forms_and_mismatch(tmp_path):
    m = create_model("test_resnet", num_classes=4)
    atomic_save({"student": m.state_dict(), "ema": None}, tmp_path / "run.pt")
    atomic_save(m.state_dict(), tmp_path / "plain.pt")
    for f in ("run.pt", "plain.pt"):
        again = create_model("test_resnet", num_classes=4, checkpoint=str(tmp_path / f))
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))
    with pytest.raises(CheckpointMismatch, match="fc.weight"):
        create_model("test_resnet", num_classes=9, checkpoint=str(tmp_path / "plain.pt"))
    (tmp_path / "cut.pt").write_bytes((tmp_path / "plain.pt").read_bytes()[:200])
    with pytest.raises(CheckpointMismatch, match="cut.pt"):
        read_state_dict(tmp_path / "cut.pt")


def test_teacher_is_frozen_and_applies_its_own_input(tmp_path):
    m = create_model("test_resnet", num_classes=4)
    atomic_save({"model": m.state_dict()}, tmp_path / "t.pt")
    teacher = create_teacher("test_resnet", False, str(tmp_path / "t.pt"), 4, img_size=96)
    teacher.train()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.rand(2, 3, 64, 64)
    out = teacher(x)
    spec = input_spec(m)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    resized = torch.nn.functional.interpolate(x, size=(96, 96), mode="bilinear", antialias=True)
    assert torch.allclose(out, m.eval()((resized - mean) / std), atol=1e-5)


def test_losses():
    logits = torch.randn(8, 10)
    assert kl_divergence(logits, soften(logits)).abs() < 1e-5  # matched distributions
    assert kl_divergence(torch.randn(8, 10), soften(logits)) > 0
    labels = torch.randint(0, 10, (8,))
    t = distillation_loss(logits, soften(logits), labels, labels, torch.ones(8), kd_weight=1.0, ce_weight=0.5)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(t["ce"], ce) and torch.allclose(t["loss"], t["kd"] + 0.5 * ce)
    # top-k storage: the full distribution comes back exactly when k covers the support
    probs = soften(logits)
    top = probs.topk(10)
    assert torch.allclose(dense_from_topk(top.indices, top.values.half(), 10), probs, atol=1e-3)
    # stored at temperature 1, softened later: the same as the teacher's softmax at that temperature
    assert torch.allclose(dense_from_topk(top.indices, top.values, 10, temperature=2.0), soften(logits, 2.0), atol=1e-5)


def test_topk_targets_spread_the_left_over_mass_evenly():
    # the top 2 of 5 classes hold 0.8; the other 0.2 goes to the three others alike, not to nobody
    dense = dense_from_topk(torch.tensor([[2, 0]]), torch.tensor([[0.5, 0.3]]).half(), 5)
    assert dense[0].tolist() == pytest.approx([0.3, 0.2 / 3, 0.5, 0.2 / 3, 0.2 / 3], abs=1e-3)
    # at another temperature: the spread distribution, softened
    soft = dense_from_topk(torch.tensor([[2, 0]]), torch.tensor([[0.5, 0.3]]), 5, temperature=2.0)
    want = torch.tensor([0.3, 0.2 / 3, 0.5, 0.2 / 3, 0.2 / 3]).sqrt()
    assert torch.allclose(soft[0], want / want.sum(), atol=1e-6)
