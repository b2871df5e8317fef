"""Augmentation presets: output contract, what each preset does, errors, seeding."""
import albumentations as A
import numpy as np
import pytest

from distill.data.augment import create_augment, list_presets, preset_params, randaugment_ops


def sample_image(h=60, w=90) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["inception_randaug_tf", "inception_randaug", "inception", "flip", "eval"])
@pytest.mark.parametrize("size", [32, 48])
def test_presets_give_chw_uint8(name, size):
    augment = create_augment(name, size, seed=0)
    for _ in range(5):
        out = augment(sample_image())
        assert out.shape == (3, size, size) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]


def test_eval_is_a_resized_centre_crop():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, :100] = 255  # left half white, right half black
    out = create_augment("eval", 50, crop_pct=0.5)(image)  # short side -> 100 (no resize), centre 50x50
    assert out.shape == (3, 50, 50)
    assert (out[:, :, :24] == 255).all() and (out[:, :, 26:] == 0).all()
    again = create_augment("eval", 50, crop_pct=0.5)(image)
    assert np.array_equal(out, again)


def test_flip_preset_only_flips():
    image = sample_image(32, 32)
    seen = set()
    augment = create_augment("flip", 32, seed=1)
    for _ in range(20):
        out = augment(image).transpose(1, 2, 0)
        if np.array_equal(out, image):
            seen.add("same")
        elif np.array_equal(out, image[:, ::-1]):
            seen.add("flipped")
        else:
            pytest.fail("the flip preset changed more than the orientation")
    assert seen == {"same", "flipped"}


def test_randaugment_strength_follows_magnitude():
    ys, xs = np.mgrid[0:64, 0:64]
    image = np.stack([xs * 4, ys * 4, (xs + ys) * 2], -1).astype(np.uint8)

    def change(magnitude):  # mean pixel change made by the RandAugment ops alone
        ops = A.Compose([A.SomeOf(randaugment_ops(magnitude), n=2, replace=True)], seed=0)
        return np.mean([np.abs(ops(image=image)["image"].astype(int) - image).mean() for _ in range(200)])

    weak, medium, strong = change(0), change(5), change(10)
    assert weak < 10 and medium > weak + 5 and strong > medium + 5
    with pytest.raises(ValueError, match="magnitude"):
        randaugment_ops(11)


def test_same_seed_same_views_other_seed_other_views():
    image = sample_image()
    a, b, c = (create_augment("inception_randaug", 32, seed=s) for s in (5, 5, 6))
    va, vb, vc = ([aug(image) for _ in range(4)] for aug in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(va, vb))
    assert not all(np.array_equal(x, y) for x, y in zip(va, vc))
    a.reseed(6)
    assert all(np.array_equal(a(image), y) for y in [create_augment("inception_randaug", 32, seed=6)(image)])


def test_unknown_names_are_errors_listing_valid_ones():
    assert {"inception_randaug_tf", "inception_randaug", "inception", "flip", "eval"} <= set(list_presets())
    assert preset_params("inception_randaug")["magnitude"] == 9 and preset_params("inception_randaug")["num_ops"] == 2
    with pytest.raises(ValueError, match=r"unknown augmentation preset 'autoaug'.*inception_randaug"):
        create_augment("autoaug", 32)
    with pytest.raises(ValueError, match=r"unknown parameters \['magnitud'\].*'magnitude'"):
        create_augment("inception_randaug", 32, magnitud=5)
    with pytest.raises(ValueError, match="crop_pct"):
        create_augment("eval", 32, crop_pct=1.5)


@pytest.mark.parametrize("name", ["inception_randaug_tf", "inception_randaug", "inception", "flip", "eval"])
def test_presets_survive_pickling_with_their_stream(name):
    """Loader workers receive pickled copies; a copy reseeded alike augments alike."""
    import pickle

    image = sample_image()
    a = create_augment(name, 32, seed=1)
    b = pickle.loads(pickle.dumps(a))
    a.reseed(3)
    b.reseed(3)
    assert all(np.array_equal(a(image), b(image)) for _ in range(3))
