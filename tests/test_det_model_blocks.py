"""Encoder blocks, hybrid encoder and deformable attention of the RT-DETR model."""
import itertools
import math

import pytest
import torch

from distill.detection.blocks import (
    DOWNSAMPLES, ENCODER_ATTENTIONS, FUSION_UNITS, AIFI, CompactInvertedBlock, PartialSelfAttention, RepVGGUnit,
    UniversalInvertedBottleneck, sincos_position_embedding)
from distill.detection.deformable_attention import MSDeformableAttention, deformable_attention_core
from distill.detection.hybrid_encoder import HybridEncoder

UNIT_TYPES = {"csp_repvgg": RepVGGUnit, "uib": UniversalInvertedBottleneck, "extradw": UniversalInvertedBottleneck,
              "cib": CompactInvertedBlock}


def _feats(batch=2, channels=(8, 16, 24), size=32):
    return [torch.randn(batch, c, size // 2**i, size // 2**i) for i, c in enumerate(channels)]


@pytest.mark.parametrize("fusion,downsample,attention",
                         [(f, "conv", "aifi") for f in sorted(FUSION_UNITS)] +
                         [("csp_repvgg", d, a)
                          for d, a in itertools.product(sorted(DOWNSAMPLES), sorted(ENCODER_ATTENTIONS))
                          if (d, a) != ("conv", "aifi")])
def test_every_block_option_builds_runs_and_trains(fusion, downsample, attention):
    torch.manual_seed(0)
    enc = HybridEncoder([8, 16, 24], hidden_dim=32, expansion=0.5, depth_mult=0.34, fusion_block=fusion,
                        downsample=downsample, attention=attention, num_heads=4, dim_feedforward=64)
    assert isinstance(enc.top_down[0].units[0], UNIT_TYPES[fusion])
    assert isinstance(enc.attention, {"aifi": AIFI, "psa": PartialSelfAttention}[attention])
    outs = enc(_feats())
    assert [tuple(o.shape) for o in outs] == [(2, 32, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8)]
    sum(o.square().mean() for o in outs).backward()
    no_grad = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_dfine_neck_matches_the_reference_layer_widths_and_trains():
    """D-FINE's neck: RepELAN fusion layers (stages round(expansion · dim / 2) wide) and linear SCDown."""
    from distill.detection.blocks import RepELAN

    torch.manual_seed(0)
    enc = HybridEncoder([8, 16, 24], hidden_dim=32, expansion=0.5, depth_mult=0.34, fusion_block="rep_elan",
                        downsample="scdown_linear", num_heads=4, dim_feedforward=64)
    layer = enc.bottom_up[1]
    assert isinstance(layer, RepELAN) and len(layer.csp_rep1.units) == 1
    assert layer.conv1.conv.weight.shape[:2] == (64, 64) and layer.conv4.conv.weight.shape[:2] == (32, 64 + 2 * 8)
    assert isinstance(enc.lateral[0].act, torch.nn.Identity)  # D-FINE's lateral convs have no activation
    assert all(isinstance(m.act, torch.nn.Identity) for m in enc.downsample[0])
    outs = enc(_feats())
    assert [tuple(o.shape) for o in outs] == [(2, 32, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8)]
    sum(o.square().mean() for o in outs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_extradw_adds_a_depthwise_conv_and_unknown_names_list_choices():
    plain, extra = FUSION_UNITS["uib"](16), FUSION_UNITS["extradw"](16)
    assert sum(p.numel() for p in extra.parameters()) - sum(p.numel() for p in plain.parameters()) == 16 * 9 + 2 * 16
    with pytest.raises(ValueError, match=r"fusion block 'c2f'.*csp_repvgg"):
        HybridEncoder([8, 16, 24], hidden_dim=32, fusion_block="c2f")
    with pytest.raises(ValueError, match=r"downsample .*scdown"):
        HybridEncoder([8, 16, 24], hidden_dim=32, downsample="maxpool")


def test_encoder_with_two_levels():
    enc = HybridEncoder([16, 24], hidden_dim=32, num_heads=4, dim_feedforward=64)
    outs = enc(_feats(channels=(16, 24), size=16))
    assert [tuple(o.shape[1:]) for o in outs] == [(32, 16, 16), (32, 8, 8)]


def test_repvgg_reparameterisation_keeps_outputs():
    torch.manual_seed(0)
    unit = RepVGGUnit(8)
    unit.train()
    for _ in range(3):  # non-trivial batch-norm statistics
        unit(torch.randn(4, 8, 10, 10) * 3 + 1)
    unit.eval()
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        before = unit(x)
        unit.reparameterize()
        after = unit(x)
    assert unit.fused is not None and not hasattr(unit, "conv3")
    assert torch.allclose(before, after, atol=1e-5)


def test_position_embedding_follows_the_flattened_layout():
    h, w, dim = 3, 5, 16
    emb = sincos_position_embedding(h, w, dim)[0]
    omega = 1.0 / 10000 ** (torch.arange(4) / 4)
    row, col = 2, 4  # position row * w + col of x.flatten(2)
    # rows first, as the reference and transformers lay it out
    assert torch.allclose(emb[row * w + col, :4], torch.sin(row * omega))
    assert torch.allclose(emb[row * w + col, 8:12], torch.sin(col * omega))


def test_position_embedding_equals_the_reference_layouts():
    """transformers' RT-DETR embedding on any map, and RT-DETR's reference definition on its square maps
    (its meshgrid puts the row index in the terms it names after the width)."""
    modeling = pytest.importorskip("transformers.models.rt_detr_v2.modeling_rt_detr_v2")
    for h, w in [(4, 4), (3, 5)]:
        ours = sincos_position_embedding(h, w, 32)[0]
        theirs = modeling.build_2d_sinusoidal_position_embedding(h, w, 32).float()
        assert torch.allclose(ours, theirs, atol=1e-5), (h, w)

    side, dim = 4, 32  # the reference's build_2d_sincos_position_embedding(w, h, dim), transcribed
    grid_w, grid_h = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                    indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = grid_w.flatten()[:, None] * omega, grid_h.flatten()[:, None] * omega
    reference = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    assert torch.allclose(sincos_position_embedding(side, side, dim)[0], reference, atol=1e-6)


def _bilinear(image, x, y):
    """Naive bilinear sample of image (C, h, w) at normalised (x, y), pixel centres at (i + 0.5) / size,
    zero outside."""
    c, h, w = image.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(c, dtype=image.dtype)
    for yy, xx in itertools.product((y0, y0 + 1), (x0, x0 + 1)):
        weight = (1 - abs(px - xx)) * (1 - abs(py - yy))
        if 0 <= xx < w and 0 <= yy < h:
            out += weight * image[:, yy, xx]
    return out


def test_deformable_attention_matches_naive_computation():
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    batch, heads, dim, queries, points = 2, 2, 3, 4, 2
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, dim, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, dtype=torch.float64) * 1.2 - 0.1
    weights = torch.rand(batch, queries, heads, len(shapes), points, dtype=torch.float64)
    got = deformable_attention_core(value, shapes, locations, weights)

    expected = torch.zeros(batch, queries, heads, dim, dtype=torch.float64)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for b, q, m, lvl, p in itertools.product(range(batch), range(queries), range(heads), range(len(shapes)),
                                             range(points)):
        h, w = shapes[lvl]
        image = value[b, starts[lvl]:starts[lvl] + h * w, m].T.reshape(dim, h, w)
        x, y = locations[b, q, m, lvl, p].tolist()
        expected[b, q, m] += weights[b, q, m, lvl, p] * _bilinear(image, x, y)
    assert torch.allclose(got, expected.reshape(batch, queries, heads * dim), atol=1e-10)


def test_sampling_offsets_scale_with_the_reference_box():
    """A box of zero size pulls every sampling point onto its centre (v2: offsets × box size)."""
    torch.manual_seed(0)
    attn = MSDeformableAttention(embed_dim=4, num_heads=2, num_levels=1, num_points=3)
    with torch.no_grad():
        for linear in (attn.value_proj, attn.output_proj):
            linear.weight.copy_(torch.eye(4))
            linear.bias.zero_()
        attn.sampling_offsets.weight.normal_()
    value_map = torch.randn(1, 4, 5, 6)
    value = value_map.flatten(2).transpose(1, 2)
    centre = (0.37, 0.61)
    query = torch.randn(1, 1, 4)
    point_box = torch.tensor([[[*centre, 0.0, 0.0]]])
    out = attn(query, point_box, value, [(5, 6)])
    assert torch.allclose(out[0, 0], _bilinear(value_map[0], *centre), atol=1e-5)
    wide_box = torch.tensor([[[*centre, 0.8, 0.8]]])
    assert not torch.allclose(attn(query, wide_box, value, [(5, 6)]), out, atol=1e-3)
