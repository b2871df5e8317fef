"""The D-FINE head against the official D-FINE code: tests/data/dfine_reference.pt holds the official
decoder's weights, inputs, outputs and losses, and DEIM's losses on the same outputs (written by
scripts/make_dfine_reference.py from Peterande/D-FINE and ShihuaHuang95/DEIM); this project's head, given
the same weights and inputs, must reproduce them."""
from pathlib import Path

import pytest
import torch

from distill.detection.dfine_criterion import DFINECriterion, union_of_matches
from distill.detection.dfine_decoder import DFineDecoder
from distill.detection.dfine_layout import from_reference, reference_key
from distill.detection.distribution import box_to_distance, distance_to_box, integral, weighting_function

FIXTURE = Path(__file__).parent / "data" / "dfine_reference.pt"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE, weights_only=True)


def _decoder(reference) -> DFineDecoder:
    c = reference["config"]
    decoder = DFineDecoder(c["num_classes"], [c["hidden_dim"]] * len(c["strides"]), c["strides"], c["hidden_dim"],
                           c["num_queries"], c["num_layers"], c["num_heads"], c["points_per_level"],
                           c["dim_feedforward"], 0.0, c["num_denoising"], reg_max=c["reg_max"],
                           reg_scale=c["reg_scale"])
    weights = {k: v.float() for k, v in reference["weights"].items()}
    decoder.load_state_dict(from_reference(decoder, weights), strict=True)
    return decoder


def _flatten(outputs: dict) -> dict[str, torch.Tensor]:
    flat = {k: v for k, v in outputs.items() if torch.is_tensor(v)}
    for key in ("pre_outputs", "dn_pre_outputs"):
        flat.update({f"{key}.{k}": v for k, v in outputs.get(key, {}).items()})
    for key in ("aux_outputs", "enc_outputs", "dn_outputs"):
        for i, layer in enumerate(outputs.get(key, [])):
            flat.update({f"{key}.{i}.{k}": v for k, v in layer.items()})
    return flat


def _max_differences(got: dict, want: dict) -> dict[str, float]:
    assert sorted(got) == sorted(want)
    return {k: (got[k].detach().float() - want[k].float()).abs().max().item() if got[k].numel() else 0.0
            for k in want}


@pytest.fixture(scope="module")
def trained_outputs(reference):
    decoder = _decoder(reference).train()
    torch.manual_seed(reference["seeds"]["denoising"])  # the same denoising noise as the reference drew
    outputs = decoder(reference["feats"], reference["targets"])
    return decoder, outputs


def test_every_reference_tensor_has_a_place_and_only_constants_are_left():
    decoder = DFineDecoder(3, [32, 32], [16, 32], 32, 10, 3, 4, [3, 2], 64)
    reference = torch.load(FIXTURE, weights_only=True)
    used = {reference_key(k) for k in decoder.state_dict()}
    assert used <= set(reference["weights"])
    assert sorted(set(reference["weights"]) - used) == sorted(
        ["up", "reg_scale", "decoder.up", "decoder.reg_scale"]
        + [f"decoder.layers.{i}.cross_attn.num_points_scale" for i in range(3)])
    wrong = DFineDecoder(3, [32, 32], [16, 32], 32, 10, 3, 4, [2, 3], 64)  # other points per level: refused
    with pytest.raises(ValueError, match="points per level"):
        from_reference(wrong, {k: v.float() for k, v in reference["weights"].items()})


def test_training_outputs_match_the_reference(reference, trained_outputs):
    _, outputs = trained_outputs
    assert outputs["dn_meta"]["num_denoising"] == reference["num_denoising"]
    differences = _max_differences(_flatten({k: v for k, v in outputs.items() if k != "dn_meta"}),
                                   reference["train_outputs"])
    assert max(differences.values()) < TOLERANCE, {k: v for k, v in differences.items() if v >= TOLERANCE}


def test_eval_outputs_match_the_reference(reference):
    decoder = _decoder(reference).eval()
    with torch.no_grad():
        outputs = decoder(reference["feats"])
    differences = _max_differences(outputs, reference["eval_outputs"])
    assert max(differences.values()) < TOLERANCE, differences


def test_every_loss_term_matches_the_reference(reference, trained_outputs):
    c = reference["config"]
    _, outputs = trained_outputs
    losses = DFINECriterion(c["num_classes"], reg_max=c["reg_max"], reg_scale=c["reg_scale"])(
        outputs, reference["targets"])
    want = reference["losses"]
    assert sorted(losses) == sorted(want)
    assert all(v > 0 for k, v in want.items() if k != f"loss_ddf_dn_{c['num_layers'] - 1}")  # none trivially zero
    differences = {k: abs(losses[k].item() - want[k].item()) for k in want}
    assert max(differences.values()) < TOLERANCE, {k: v for k, v in differences.items() if v >= TOLERANCE}
    # relative too, for the small terms
    assert all(differences[k] <= 1e-3 * abs(want[k].item()) + 1e-6 for k in want), differences


def test_gradients_match_the_reference(reference):
    """Every weight learns from the same losses through the same (detached or not) paths as in the reference:
    the gradient of the summed losses has the reference's norm and sum, tensor by tensor."""
    c = reference["config"]
    decoder = _decoder(reference).train()
    torch.manual_seed(reference["seeds"]["denoising"])
    outputs = decoder(reference["feats"], reference["targets"])
    losses = DFINECriterion(c["num_classes"], reg_max=c["reg_max"], reg_scale=c["reg_scale"])(
        outputs, reference["targets"])
    sum(losses.values()).backward()
    want = dict(zip(reference["gradients"]["names"], reference["gradients"]["norm_and_sum"]))
    got = {reference_key(name): torch.stack([p.grad.norm(), p.grad.sum()])
           for name, p in decoder.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert torch.allclose(got[name], value, rtol=1e-4, atol=1e-5), (name, got[name], value)


def test_matchability_aware_loss_matches_deim(reference, trained_outputs):
    """DEIM's criterion (MAL, gamma 1.5) on the same outputs; it leaves out the last denoising layer's
    distillation term, which is zero by construction (that layer is the teacher) and D-FINE logs."""
    c = reference["config"]
    _, outputs = trained_outputs
    losses = DFINECriterion(c["num_classes"], gamma=1.5, reg_max=c["reg_max"], reg_scale=c["reg_scale"],
                            classification="mal")(outputs, reference["targets"])
    want = reference["deim_losses"]
    teacher_term = f"loss_ddf_dn_{c['num_layers'] - 1}"
    assert sorted(set(losses) - {teacher_term}) == sorted(want) and losses[teacher_term] == 0
    assert sum(k.startswith("loss_mal") for k in want) == 9 and all(want[k] > 0 for k in want)
    differences = {k: abs(losses[k].item() - want[k].item()) for k in want}
    assert max(differences.values()) < TOLERANCE, {k: v for k, v in differences.items() if v >= TOLERANCE}
    assert all(differences[k] <= 1e-3 * abs(want[k].item()) + 1e-6 for k in want), differences
    # and it is not the varifocal loss under another name
    assert abs(want["loss_mal"].item() - reference["losses"]["loss_vfl"].item()) > 100 * TOLERANCE


def test_weighting_function_and_distance_round_trip():
    w = weighting_function(32, 0.5, 4.0)
    assert w.shape == (33,) and w[16] == 0 and w[0] == -4 and w[-1] == 4  # ±2 · up · reg_scale at the ends
    assert torch.allclose(w[1:16], -w[17:32].flip(0)) and (w.diff() > 0).all()
    assert torch.allclose(w[[1, 31]], torch.tensor([-2.0, 2.0]))  # the inner bins end at ±up · reg_scale
    # bins grow away from the centre: fine steps near zero, coarse ones outside
    assert w[17] - w[16] < w[31] - w[30]

    ref = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1]])
    target = torch.tensor([[0.35, 0.25, 0.62, 0.71], [0.26, 0.52, 0.35, 0.66]])  # xyxy
    index, right, left = box_to_distance(ref, target, 32, 4.0)
    # a distribution that puts exactly those weights on the two bins reproduces the target box
    logits = torch.full((8, 33), -1e4)
    lo = index.long()
    logits[torch.arange(8), lo] = left.clamp(min=1e-30).log()
    logits[torch.arange(8), lo + 1] = right.clamp(min=1e-30).log()
    boxes = distance_to_box(ref, integral(logits.reshape(2, 132), w), 4.0)
    want = torch.cat([(target[:, :2] + target[:, 2:]) / 2, target[:, 2:] - target[:, :2]], 1)
    assert torch.allclose(boxes, want, atol=1e-5)


def test_union_of_matches_keeps_each_querys_most_frequent_target():
    t = torch.tensor
    sets = [
        [(t([0, 4]), t([1, 0])), (t([]), t([]))],
        [(t([0, 5]), t([1, 0])), (t([]), t([]))],
        [(t([0, 4]), t([0, 1])), (t([]), t([]))],
    ]
    (rows, cols), (empty_rows, _) = union_of_matches(sets)
    assert rows.tolist() == [0, 4, 5] and cols.tolist() == [1, 0, 0]  # query 4: targets 0 and 1 once each
    assert len(empty_rows) == 0
