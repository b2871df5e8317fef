import pytest

from distill.config import ConfigError, load_pretrain_config

MNV4 = ["mnv4_conv_s", "mnv4_conv_m", "mnv4_hybrid_m", "mnv4_conv_l", "mnv4_hybrid_l"]


@pytest.mark.parametrize("recipe", MNV4 + ["repvit_m1_1", "shufflenet_v2_x1_0"])
def test_every_recipe_loads(recipe):
    cfg = load_pretrain_config([f"recipe={recipe}"])
    assert cfg.recipe == recipe
    assert cfg.student.name and cfg.data.img_size > 0 and cfg.optim.lr > 0


def test_mnv4_recipes_carry_the_paper_table():
    # resolution, peak LR, warm-up epochs, weight decay, dropout; no stochastic depth: the paper's distillation
    # keeps final-layer dropout as its only regularisation (its supervised table's 0.075 / 0.35 do not apply)
    table = {
        "mnv4_conv_s": (224, 0.002, 5, 0.01, 0.3, 0.0),
        "mnv4_conv_m": (256, 0.004, 5, 0.1, 0.2, 0.0),
        "mnv4_hybrid_m": (256, 0.016, 20, 0.1, 0.2, 0.0),
        "mnv4_conv_l": (384, 0.004, 20, 0.2, 0.2, 0.0),
        "mnv4_hybrid_l": (384, 0.01, 20, 0.2, 0.2, 0.0),
    }
    for recipe, expected in table.items():
        c = load_pretrain_config([f"recipe={recipe}"])
        got = (c.data.img_size, c.optim.lr, c.optim.warmup_epochs, c.optim.weight_decay,
               c.student.drop_rate, c.student.drop_path_rate)
        assert got == pytest.approx(expected), recipe
        assert c.data.mix == "mnv4" and c.loss.temperature == 1.0 and c.loss.ce_weight == 0.0
        assert c.teacher.name.startswith("tf_efficientnet_l2.ns_jft_in1k")
    assert load_pretrain_config(["recipe=mnv4_conv_l"]).train.epochs == 2000


def test_overrides_apply_with_types():
    c = load_pretrain_config(["recipe=mnv4_conv_s", "optim.lr=0.0005", "data.batch_size=32", "student.pretrained=true"])
    assert c.optim.lr == 0.0005 and c.data.batch_size == 32 and c.student.pretrained is True


@pytest.mark.parametrize(
    "argv, words",
    [
        (["recipe=mnv4_conv_s", "optim.lrr=1"], ["optim.lrr", "lr", "weight_decay"]),
        (["recipe=mnv4_conv_s", "optim.lr=fast"], ["optim.lr", "fast"]),
        (["recipe=mnv4_conv_s", "data.batch_size=1.5"], ["data.batch_size"]),
        (["recipe=no_such_recipe"], ["no_such_recipe", "mnv4_conv_s"]),
        (["optim.lr=1"], ["recipe=NAME"]),
        (["recipe=mnv4_conv_s", "teacher.mode=sometimes"], ["teacher.mode", "online", "offline"]),
        (["recipe=mnv4_conv_s", "loose"], ["loose", "key=value"]),
    ],
)
def test_bad_input_is_named(argv, words):
    with pytest.raises(ConfigError) as e:
        load_pretrain_config(argv)
    for w in words:
        assert w in str(e.value)


def test_typo_in_recipe_file_names_file_and_key(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.1\n")
    (tmp_path / "child.yaml").write_text("base: base\nstudnet:\n  name: x\n")
    with pytest.raises(ConfigError) as e:
        load_pretrain_config(["recipe=child"], recipe_dir=tmp_path)
    assert "studnet" in str(e.value) and "child.yaml" in str(e.value) and "student" in str(e.value)
    (tmp_path / "ok.yaml").write_text("base: base\nstudent:\n  name: test_resnet\n")
    c = load_pretrain_config(["recipe=ok"], recipe_dir=tmp_path)
    assert c.optim.lr == 0.1 and c.student.name == "test_resnet"
