"""RandAugment as TensorFlow's TPU EfficientNet code defines it: every op's argument at a magnitude against
the reference formulas, every op against a plain-numpy transcription of the reference's definition, and the
layer rule (one of 16 ops, uniformly, always applied)."""
import random
from collections import Counter

import numpy as np
import pytest

from distill.data import randaugment as ra
from distill.data.augment import create_augment

# Arguments at magnitude 9 and 5 (f = m / 10): the paper's D1 and D3.
EXPECTED_ARGS = {
    9: {"Rotate": 27.0, "Posterize": 3, "Solarize": 230, "Color": 1.72, "Contrast": 1.72, "Brightness": 1.72,
        "Sharpness": 1.72, "ShearX": 0.27, "ShearY": 0.27, "TranslateX": 90.0, "TranslateY": 90.0, "Cutout": 36,
        "SolarizeAdd": 99},
    5: {"Rotate": 15.0, "Posterize": 2, "Solarize": 128, "Color": 1.0, "Contrast": 1.0, "Brightness": 1.0,
        "Sharpness": 1.0, "ShearX": 0.15, "ShearY": 0.15, "TranslateX": 50.0, "TranslateY": 50.0, "Cutout": 20,
        "SolarizeAdd": 55},
}


def photo(h=48, w=56, seed=0) -> np.ndarray:
    """Smooth structure plus noise, values 20..235, channels unlike each other."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    base = np.stack([xs * 3.0, ys * 3.5, (xs + ys) * 1.5 + 40], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 20, 235).astype(np.uint8)


# ---- the reference's ops, transcribed to numpy (float32 maths, truncating casts as tf.cast does) ----------


def blend(image1, image2, factor):
    if factor == 0.0:
        return image1.copy()
    if factor == 1.0:
        return image2.copy()
    temp = image1.astype(np.float32) + np.float32(factor) * (image2.astype(np.float32) - image1.astype(np.float32))
    if 0.0 < factor < 1.0:
        return temp.astype(np.uint8)
    return np.clip(temp, 0.0, 255.0).astype(np.uint8)


def ref_autocontrast(image):
    out = []
    for c in range(3):
        ch = image[..., c]
        lo, hi = np.float32(ch.min()), np.float32(ch.max())
        if hi > lo:
            scale = np.float32(255.0) / (hi - lo)
            ch = np.clip(ch.astype(np.float32) * scale + (-lo * scale), 0, 255).astype(np.uint8)
        out.append(ch)
    return np.stack(out, -1)


def ref_equalize(image):
    out = []
    for c in range(3):
        im = image[..., c].astype(np.int32)
        histo = np.bincount(im.ravel(), minlength=256)
        nonzero = histo[histo != 0]
        step = (nonzero.sum() - nonzero[-1]) // 255
        if step == 0:
            out.append(im.astype(np.uint8))
            continue
        lut = np.clip(np.concatenate([[0], ((np.cumsum(histo) + step // 2) // step)[:-1]]), 0, 255)
        out.append(lut[im].astype(np.uint8))
    return np.stack(out, -1)


def ref_grey(image):  # tf.image.rgb_to_grayscale, then back to uint8 as convert_image_dtype does
    flt = image.astype(np.float32) / 255.0
    grey = flt @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    return (grey * 255.5).astype(np.uint8)


def ref_color(image, factor):
    return blend(np.repeat(ref_grey(image)[..., None], 3, -1), image, factor)


def ref_contrast(image, factor):
    hist = np.bincount(ref_grey(image).ravel(), minlength=256)
    mean = np.float32(hist.sum()) / 256.0
    degenerate = np.full(image.shape, np.clip(mean, 0, 255), np.float32).astype(np.uint8)
    return blend(degenerate, image, factor)


def ref_sharpness(image, factor):
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
    img = image.astype(np.float32)
    h, w = image.shape[:2]
    conv = sum(kernel[dy, dx] * img[dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3))
    result = image.copy()
    result[1:-1, 1:-1] = np.clip(conv, 0, 255).astype(np.uint8)
    return blend(result, image, factor)


def ref_transform(image, matrix):
    """Projective transform in float32, nearest pixel (std::round: halves away from zero), grey outside."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    (a0, a1, a2), (b0, b1, b2) = np.asarray(matrix, np.float32)
    u, v = a0 * xs + a1 * ys + a2, b0 * xs + b1 * ys + b2
    iu, iv = (np.sign(u) * np.floor(np.abs(u) + 0.5)).astype(int), (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(int)
    inside = (iu >= 0) & (iu < w) & (iv >= 0) & (iv < h)
    out = np.full_like(image, 128)
    out[inside] = image[iv[inside], iu[inside]]
    return out


def ref_rotate(image, degrees):
    h, w = image.shape[:2]
    a = np.deg2rad(degrees)
    x_off = ((w - 1) - (np.cos(a) * (w - 1) - np.sin(a) * (h - 1))) / 2.0
    y_off = ((h - 1) - (np.sin(a) * (w - 1) + np.cos(a) * (h - 1))) / 2.0
    return ref_transform(image, [[np.cos(a), -np.sin(a), x_off], [np.sin(a), np.cos(a), y_off]])


REFERENCE = {
    "AutoContrast": lambda im, arg: ref_autocontrast(im),
    "Equalize": lambda im, arg: ref_equalize(im),
    "Invert": lambda im, arg: 255 - im,
    "Rotate": ref_rotate,
    "Posterize": lambda im, bits: np.left_shift(np.right_shift(im, 8 - bits), 8 - bits),
    "Solarize": lambda im, t: np.where(im < t, im, 255 - im),
    "Color": ref_color,
    "Contrast": ref_contrast,
    "Brightness": lambda im, f: blend(np.zeros_like(im), im, f),
    "Sharpness": ref_sharpness,
    "ShearX": lambda im, level: ref_transform(im, [[1, level, 0], [0, 1, 0]]),
    "ShearY": lambda im, level: ref_transform(im, [[1, 0, 0], [level, 1, 0]]),
    # translate(image, [-pixels, 0]): output x shows input x + pixels
    "TranslateX": lambda im, px: ref_transform(im, [[1, 0, px], [0, 1, 0]]),
    "TranslateY": lambda im, px: ref_transform(im, [[1, 0, 0], [0, 1, px]]),
    "SolarizeAdd": lambda im, add: np.where(im < 128, np.clip(im.astype(int) + add, 0, 255), im).astype(np.uint8),
}
# Blends round where the reference truncates, and Color's grey weights differ in the 4th decimal.
TOLERANCE = {"Color": 2, "Sharpness": 2}


@pytest.mark.parametrize("magnitude", [9, 5])
def test_arguments_follow_the_reference_formulas(magnitude):
    args = ra.RandAugment(2, magnitude).args
    for name, expected in EXPECTED_ARGS[magnitude].items():
        assert args[name] == pytest.approx(expected, abs=1e-9), name
        assert type(args[name]) is type(expected) or isinstance(expected, float), name  # ints stay ints
    for m in (0, 3, 7, 10):
        f = m / 10
        args = ra.RandAugment(1, m).args
        assert (args["Posterize"], args["Solarize"], args["SolarizeAdd"], args["Cutout"]) == (
            int(f * 4), int(f * 256), int(f * 110), int(f * 40))
        assert args["Rotate"] == pytest.approx(30 * f) and args["ShearX"] == pytest.approx(0.3 * f)
        assert args["TranslateY"] == pytest.approx(100 * f) and args["Sharpness"] == pytest.approx(1.8 * f + 0.1)
    assert ra.OPS == ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
                      "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout",
                      "SolarizeAdd")


@pytest.mark.parametrize("magnitude", [9, 5, 2])
@pytest.mark.parametrize("name", [op for op in ra.OPS if op != "Cutout"])
def test_each_op_matches_the_reference(name, magnitude):
    image = photo(seed=magnitude)
    before = image.copy()
    arg = ra.RandAugment(1, magnitude).args[name]
    for signed in ([arg, -arg] if name in ra.SIGNED else [arg]):
        ours = ra._APPLY[name](image, signed)
        ref = REFERENCE[name](image, signed)
        assert ours.shape == image.shape and ours.dtype == np.uint8
        if name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
            # Exact halves (a whole row at some shears) may round the other way; a wrong centre, anchor,
            # direction or rounding rule would disagree on most pixels.
            assert (ours == ref).all(-1).mean() > 0.95, name
            assert not np.array_equal(ours, image) or signed == 0
        else:
            assert np.abs(ours.astype(int) - ref).max() <= TOLERANCE.get(name, 0), name
    assert np.array_equal(image, before)  # the input is never written to


def test_apply_draws_signs_and_cutout_centres():
    image = photo(120, 160)
    aug = ra.RandAugment(1, 9)
    rng = random.Random(0)
    shifted = Counter()
    for _ in range(200):
        out = aug.apply("TranslateX", image, rng)
        shifted["left" if np.array_equal(out, REFERENCE["TranslateX"](image, 90.0)) else "right"] += 1
    assert 70 < shifted["left"] < 130 and shifted["left"] + shifted["right"] == 200
    for _ in range(50):
        out = aug.apply("Cutout", image, rng)
        grey = np.argwhere((out != image).any(-1))
        assert (out[tuple(grey.T)] == 128).all()
        (y0, x0), (y1, x1) = grey.min(0), grey.max(0) + 1
        assert y1 - y0 <= 72 and x1 - x0 <= 72  # a 2 x 36 square, clipped at the borders
        assert y1 - y0 == 72 or y0 == 0 or y1 == image.shape[0]
        assert x1 - x0 == 72 or x0 == 0 or x1 == image.shape[1]


def test_every_layer_applies_one_of_16_ops_uniformly():
    image = photo()
    aug = ra.RandAugment(2, 9)
    chosen = Counter()
    apply = aug.apply

    def counting(name, im, rng):
        chosen[name] += 1
        return apply(name, im, rng)

    aug.apply = counting
    rng = random.Random(1)
    unchanged = sum(np.array_equal(aug(image, rng), image) for _ in range(800))
    assert sum(chosen.values()) == 1600 and set(chosen) == set(ra.OPS)
    assert min(chosen.values()) > 60 and max(chosen.values()) < 140  # 100 expected each
    # always applied: only a pair of inverting ops (Invert twice) gives the image back
    assert unchanged <= 800 * 3 / 256 + 5


def test_preset_at_magnitude_5_leaves_enhance_ops_as_identity():
    image = photo()
    aug = ra.RandAugment(1, 5)
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert np.array_equal(aug.apply(name, image, random.Random(0)), image)
    with pytest.raises(ValueError, match="magnitude"):
        ra.RandAugment(2, 11)
    with pytest.raises(ValueError, match="num_ops"):
        create_augment("inception_randaug_tf", 32, num_ops=-1)


def test_tf_preset_output_and_seeding():
    image = photo(90, 120)
    a, b = (create_augment("inception_randaug_tf", 32, seed=3, magnitude=9) for _ in range(2))
    outs = [a(image) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) and o.dtype == np.uint8 and o.flags["C_CONTIGUOUS"] for o in outs)
    assert all(np.array_equal(x, b(image)) for x in outs)
    a.reseed(11)
    first = a(image)
    a.reseed(11)
    assert np.array_equal(a(image), first)
