"""Decoding only what a crop needs: the decoder's output, reduced-scale decoding, and that a crop planned on the
header keeps the Inception crop's geometry (scale and ratio relative to the original image) whatever the
decode scale."""
import math
import random

import cv2
import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from distill.data.augment import create_augment
from distill.data.crop import InceptionCrop, source_box
from distill.data.decode import DecodeError, decode_rgb, jpeg_size, reduction_for
from distill.data.shards import CorruptSampleError, decode_augmented, decode_sample, encode_jpeg


def textured(h, w, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 2)


def gradient_jpeg(h, w) -> bytes:
    """Red = column, green = row, each 0..255 across the image: a crop's pixels tell where it came from."""
    ys, xs = np.mgrid[0:h, 0:w]
    image = np.stack([xs * 255.0 / (w - 1), ys * 255.0 / (h - 1), np.full((h, w), 128.0)], -1)
    return encode_jpeg(np.round(image).astype(np.uint8), quality=98)


def test_decode_matches_opencv_and_reads_other_formats():
    image = textured(157, 203)
    data = encode_jpeg(image, 90)
    ours = decode_rgb(data)
    theirs = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert ours.shape == (157, 203, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - theirs).max() <= 1
    assert jpeg_size(data) == (157, 203)

    ok, png = cv2.imencode(".png", image[..., ::-1])
    assert jpeg_size(png.tobytes()) is None and np.array_equal(decode_rgb(png.tobytes(), reduction=4), image)
    ok, grey = cv2.imencode(".jpg", image[..., 0])
    decoded = decode_rgb(grey.tobytes())
    assert decoded.shape == (157, 203, 3) and (decoded[..., 0] == decoded[..., 2]).all()
    assert decode_rgb(data[: len(data) // 2]).shape == (157, 203, 3)  # truncated: decoded as far as it goes
    with pytest.raises(DecodeError, match="could not be decoded"):
        decode_rgb(b"\xff\xd8\xffnot really")
    with pytest.raises(CorruptSampleError, match=r"sample 'k7' in s\.tar: image bytes \(14 B\)"):
        decode_sample({"__key__": "k7", "__url__": "s.tar", "jpg": b"\x00" * 14, "cls": b"1"})


@pytest.mark.parametrize("reduction", [2, 4, 8])
def test_reduced_decode_is_a_downscaled_image(reduction):
    image = textured(157, 203)
    data = encode_jpeg(image, 95)
    small = decode_rgb(data, reduction)
    assert small.shape == (math.ceil(157 / reduction), math.ceil(203 / reduction), 3)
    fh, fw = 157 // reduction, 203 // reduction  # whole blocks: the image's last partial ones are scaled apart
    area = cv2.resize(decode_rgb(data)[: fh * reduction, : fw * reduction], (fw, fh), interpolation=cv2.INTER_AREA)
    assert np.abs(small[:fh, :fw].astype(int) - area).mean() < 2


def test_reduction_keeps_the_crop_at_least_the_output_size():
    assert reduction_for(400, 300, 224, 224) == 1
    assert reduction_for(900, 460, 224, 224) == 2
    assert reduction_for(1800, 1800, 224, 224) == 8 and reduction_for(1800, 1800, 224, 224, limit=4) == 4
    assert reduction_for(1000, 1000, 64, 64) == 8


def test_inception_crop_draws_as_torchvision_does():
    """Area fraction and log aspect ratio distributions match torchvision's RandomResizedCrop, including
    the fall-back for images far outside the ratio range."""
    for h, w in [(375, 500), (60, 400)]:
        planner, rng = InceptionCrop(32), random.Random(0)
        ours = [planner(h, w, rng) for _ in range(3000)]
        torch.manual_seed(0)
        theirs = [RandomResizedCrop.get_params(torch.empty(1, h, w), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)]
        ours_scale = np.array([c.height * c.width / (h * w) for c in ours])
        theirs_scale = np.array([ch * cw / (h * w) for _, _, ch, cw in theirs])
        ours_ratio = np.log([c.width / c.height for c in ours])
        theirs_ratio = np.log([cw / ch for _, _, ch, cw in theirs])
        for a, b in [(ours_scale, theirs_scale), (ours_ratio, theirs_ratio)]:
            qs = [0.05, 0.25, 0.5, 0.75, 0.95]
            assert np.allclose(np.quantile(a, qs), np.quantile(b, qs), atol=0.04), (h, w)
        assert all(0 <= c.top <= h - c.height and 0 <= c.left <= w - c.width for c in ours)
        assert 0.45 < np.mean([c.flip for c in ours]) < 0.55


def test_box_at_reduced_scale_is_the_planned_box():
    planner, rng = InceptionCrop(64), random.Random(1)
    h, w = 1003, 757
    for _ in range(500):
        crop = planner(h, w, rng)
        r = reduction_for(crop.height, crop.width, 64, 64)
        dh, dw = math.ceil(h / r), math.ceil(w / r)
        top, left, bottom, right = source_box(crop, dh, dw, h, w)
        for got, want in [(top * h / dh, crop.top), (left * w / dw, crop.left),
                          (bottom * h / dh, crop.top + crop.height), (right * w / dw, crop.left + crop.width)]:
            assert abs(got - want) <= r / 2 + 1


def test_decoding_only_what_the_crop_needs_keeps_the_crop_geometry():
    """From bytes (planned on the header, decoded at up to 1/8 scale) and from decoded pixels, the same seed
    gives the same crop of the original image, read back from the crop's colours."""
    h, w, out = 768, 1024, 32
    data = gradient_jpeg(h, w)
    full = decode_rgb(data)
    augment = create_augment("inception", out)
    reductions, boxes = [], {"bytes": [], "pixels": []}
    for seed in range(300):
        for path, source in (("bytes", data), ("pixels", full)):
            augment.reseed(seed)
            if path == "bytes":
                crop = augment.plan(h, w)
                reductions.append(reduction_for(crop.height, crop.width, out, out))
                augment.reseed(seed)
            view = augment(source).astype(float)
            x = view[0] * (w - 1) / 255.0  # red -> column of the original image
            y = view[1] * (h - 1) / 255.0
            boxes[path].append((y.min(), x.min(), y.max(), x.max(), x[:, 0].mean() > x[:, -1].mean()))
    assert np.mean(np.array(reductions) > 1) > 0.5 and max(reductions) == 8  # the test exercises reduced decodes
    a, b = np.array(boxes["bytes"]), np.array(boxes["pixels"])
    assert np.array_equal(a[:, 4], b[:, 4])  # same flips
    span = np.array([h, w, h, w])
    assert (np.abs(a[:, :4] - b[:, :4]) / span).max() < 0.025
    scale = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1]) / (h * w)  # noqa: E731
    ratio = lambda z: np.log((z[:, 3] - z[:, 1]) / (z[:, 2] - z[:, 0]))  # noqa: E731
    assert abs(scale(a).mean() - scale(b).mean()) < 0.005 and abs(ratio(a).mean() - ratio(b).mean()) < 0.01


@pytest.mark.parametrize("name", ["inception_randaug_tf", "inception", "flip", "eval", "inception_randaug"])
def test_bytes_in_same_seed_same_output(name):
    data = encode_jpeg(textured(300, 420), 90)
    augment = create_augment(name, 48)
    outs = []
    for seed in (4, 4, 5):
        augment.reseed(seed)
        outs.append(augment(data))
    assert outs[0].shape == (3, 48, 48) and outs[0].dtype == np.uint8 and outs[0].flags["C_CONTIGUOUS"]
    assert np.array_equal(outs[0], outs[1])
    if name != "eval":
        assert not np.array_equal(outs[0], outs[2])
    # Where no crop is twice the output (160 px of a 300 px high image), bytes and pixels give the same view.
    augment = create_augment(name, 160)
    for seed in range(5):
        augment.reseed(seed)
        from_bytes = augment(data)
        augment.reseed(seed)
        assert np.array_equal(from_bytes, augment(decode_rgb(data)))
    chw, label = decode_augmented({"__key__": "a", "jpg": data, "cls": b"3"}, augment)
    assert label == 3 and chw.shape == (3, 160, 160)
    with pytest.raises(CorruptSampleError, match="sample 'b'"):
        decode_augmented({"__key__": "b", "jpg": b"\x00" * 9, "cls": b"3"}, augment)
