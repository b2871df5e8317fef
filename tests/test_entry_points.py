"""The four entry points as a user meets them: `--help`, a recipe given to the wrong entry point, and user errors
that end in one line (exit status 2), never a traceback, whatever the recipe's values (a property test over
loading and set-up: each run stops at the start-up banner, where the loop would begin)."""
from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import os
import string
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill.cli import ENTRY_POINTS, field_comments
from distill.config import PretrainConfig, schema_keys
from distill.data.synthetic import generate_classification
from distill.data.synthetic_coco import generate_coco_shapes
from distill.engine.checkpoint import atomic_save
from distill.engine.progress import banner as real_banner
from distill.models.factory import create_model

ENTRIES = sorted(ENTRY_POINTS)  # distill.curate, distill.finetune_det, distill.label_views, distill.pretrain
CLASSES = 4


class ReachedTheLoop(Exception):
    """Raised in place of the start-up banner: set-up is done."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny data and a recipe per entry point that sets up in well under a second (no download, no fitting).
    Runs happen inside this folder: relative paths a property example invents land here."""
    root = tmp_path_factory.mktemp("entry_points")
    generate_classification(root / "shapes", num_classes=CLASSES, train_per_class=8, val_per_class=2, img_size=16,
                            seed=0, shard_size=8)
    generate_coco_shapes(root / "coco", num_train=4, num_val=2, img_size=64, num_classes=2, max_objects=2, seed=0)
    atomic_save({"model": create_model("test_resnet", num_classes=CLASSES).state_dict()}, root / "teacher.pt")
    (root / "mix.yaml").write_text("sources:\n  a: {shards: shapes/train, augment: {name: flip}}\n"
                                   "  b: {shards: shapes/train, augment: {name: flip}, mixup: true}\n")
    frozen = f"{{name: test_resnet, pretrained: false, checkpoint: {root / 'teacher.pt'}, num_classes: {CLASSES}}}"
    recipes = {
        "distill.pretrain": f"""
student: {{name: test_resnet, num_classes: {CLASSES}}}
teacher: {{name: test_resnet, pretrained: false, checkpoint: {root / 'teacher.pt'}}}
data: {{mix: {root / 'mix.yaml'}, root: {root}, img_size: 16, batch_size: 4, num_workers: 0, val_shards: shapes/val}}
train: {{steps: 2, trackers: [jsonl]}}
""",
        "distill.finetune_det": f"""
model: {{backbone: test_efficientnet, hidden_dim: 32, dim_feedforward: 64, num_heads: 2, num_queries: 10,
        num_decoder_layers: 1, num_points: 2, num_denoising: 4}}
data: {{root: {root / 'coco'}, train_images: train/images, train_ann: train/annotations.json,
       val_images: val/images, val_ann: val/annotations.json, img_size: 64, batch_size: 2, num_workers: 0}}
optim: {{warmup_steps: 1}}
train: {{steps: 2, precision: "no", trackers: [jsonl]}}
""",
        "distill.curate": f"""
data_root: {root}
pool: {{shards: shapes/train}}
scorer: {frozen}
select: {{per_class: 4}}
batch_size: 8
num_workers: 0
precision: "no"
""",
        "distill.label_views": f"""
mix: {root / 'mix.yaml'}
data_root: {root}
teacher: {frozen}
view: {{img_size: 16, topk: 2}}
batch_size: 8
num_workers: 0
precision: "no"
""",
    }
    for module, text in recipes.items():
        (root / f"{module.split('.')[1]}.yaml").write_text(text)
    return root


@pytest.fixture(scope="module", autouse=True)
def inside(world):
    """Runs happen in `world`, on one thread, with the model hub offline (a `pretrained=true` example fails at
    once instead of retrying the network for a minute)."""
    import huggingface_hub.constants

    cwd, threads, offline = os.getcwd(), torch.get_num_threads(), huggingface_hub.constants.HF_HUB_OFFLINE
    os.chdir(world)
    torch.set_num_threads(1)
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    yield
    huggingface_hub.constants.HF_HUB_OFFLINE = offline
    os.chdir(cwd)
    torch.set_num_threads(threads)


def recipe(world: Path, module: str) -> str:
    return f"recipe={world / (module.split('.')[1] + '.yaml')}"


def run(module: str, argv: list[str], banners: list | None = None) -> tuple[str, str]:
    """("loop", "") when set-up finished, ("exit N", stderr) when the entry point stopped; any other exception
    propagates (the failure these tests look for). The banner's text is appended to `banners`."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    entry = importlib.import_module(module)
    err = io.StringIO()

    def banner(*args, **kwargs):
        if banners is not None:
            banners.append(real_banner(*args, **kwargs))
        raise ReachedTheLoop

    with mock.patch.object(entry, "banner", side_effect=banner), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        try:
            entry.main(argv)
            if any(a.startswith("dry_run=") and a != "dry_run=null" for a in argv):
                return "loop", err.getvalue()  # a plan printed: set-up is all a dry run does
        except ReachedTheLoop:
            return "loop", err.getvalue()
        except SystemExit as e:  # SystemExit("error: ...") exits with status 1 and prints its message
            return ("exit 1", err.getvalue() + e.code) if isinstance(e.code, str) else (f"exit {e.code}", err.getvalue())
    raise AssertionError(f"{module} {argv} returned without reaching its loop")


@pytest.mark.parametrize("module", ENTRIES)
def test_tiny_recipe_sets_up(world, module):
    """The base of the property test below: the unmodified recipe reaches the loop."""
    assert run(module, [recipe(world, module), f"output_dir={world / 'runs' / module}"])[0] == "loop"


def test_pretrain_banner_names_mix_models_and_the_teacher_fit_key(world):
    """With no teacher weights the teacher is trained first: the banner says for how long, and which key sets it
    (`train.steps` does not)."""
    banners = []
    argv = [recipe(world, "distill.pretrain"), f"output_dir={world / 'runs' / 'banner'}", "teacher.checkpoint=null",
            "teacher.fit_steps=3", "train.steps=5"]
    assert run("distill.pretrain", argv, banners)[0] == "loop"
    (text,) = banners
    assert "5 steps = " in text and "1 process x batch 4 x accumulation 1 = 4 images a step" in text
    assert "student test_resnet: " in text and "teacher test_resnet: " in text
    assert "mix mix: a 0.50, b (mixup) 0.50; 16 px" in text
    assert "trained on labels for 3 steps first (teacher.fit_steps)" in text


# ---- property: generated values for any key end in set-up or in one line, never a traceback ----------------

text = st.text(string.ascii_letters + string.digits + "_-.,:[]{}' ", max_size=10).filter(
    lambda v: not v.startswith(("/", "~", "-")) and ".." not in v)  # relative paths only: they land in `world`
junk = st.one_of(
    st.sampled_from(["-1", "0", "1.5", "nan", "inf", str(10**30), "true", "null", "''", "[]", "[1, 2]", "[a, b]",
                     "{a: 1}", "???", "${nope}", "auto", "x"]),
    text,
)
# values of the key's own type, edges first: these get past the type check and into set-up
TYPED = {
    "int": st.one_of(st.sampled_from(["-1", "0", "1", "2", "3", "7", "64", "2147483648", str(10**30)]),
                     st.integers(-2, 100).map(str)),
    "float": st.sampled_from(["-1.0", "0.0", "1e-9", "0.5", "0.999", "1.0", "2.0", "1e30", "nan", "inf", "-inf"]),
    "bool": st.sampled_from(["true", "false"]),
    "str": st.one_of(st.sampled_from(["''", "x", "auto", "none", "no"]), text),
    "list[int]": st.sampled_from(["[]", "[32]", "[64]", "[-1]", "[0]", "[1, 2, 3]", "[64, 96]", "[8, 16, 32]"]),
    "list[float]": st.sampled_from(["[]", "[0.5]", "[0.5, 0.5, 0.5]", "[0, 0, 0]", "[1, 2]", "[0.9, 0.99]",
                                    "[2, 2, 2]", "[nan, 1, 1]"]),
    "list[str]": st.sampled_from(["[]", "[x]", "[jsonl]", "[tensorboard]", "[a, a]"]),
    "dict[str, int]": st.sampled_from(["{}", "{a: 1}", "{a: -1}", "{a: 0, b: 3}", "{zzz: 2}"]),
}


def value_for(type_name: str):
    base = type_name.replace("Optional[", "").removesuffix("]") if type_name.startswith("Optional[") else type_name
    typed = TYPED.get(base, junk)
    return st.one_of(typed, typed, typed, junk)  # three in four of the key's type
PROPERTY = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def overrides(module: str):
    keys = [k for k in schema_keys(ENTRY_POINTS[module].schema) if k.key not in ("recipe", "output_dir")]
    pair = st.sampled_from(keys).flatmap(lambda k: st.tuples(st.just(k.key), value_for(k.type)))
    return st.lists(pair, min_size=1, max_size=2)


EXAMPLES = itertools.count()


def check_outcome(world, module, pairs):
    out = world / "runs" / f"{module}-{next(EXAMPLES)}"  # a fresh folder: nothing to resume or to clash with
    argv = [recipe(world, module), f"output_dir={out}", *(f"{k}={v}" for k, v in pairs)]
    outcome, err = run(module, argv)
    if outcome == "loop":
        return
    assert outcome in ("exit 1", "exit 2"), (argv, outcome, err)
    assert "Traceback" not in err and err.strip().startswith("error: "), (argv, err)


@pytest.mark.parametrize("module", ["distill.pretrain", "distill.finetune_det", "distill.curate",
                                    "distill.label_views"])
@PROPERTY
@given(data=st.data())
def test_values_set_up_or_fail_in_one_line(world, module, data):
    check_outcome(world, module, data.draw(overrides(module)))


# ---- the cases the issue named, and what the property runs found ------------------------------------------


@pytest.mark.parametrize("override, words", [
    ("data.mix=nomix", ["nomix", "known mixes"]),
    ("data.num_workers=40", ["samples cannot be shared", "loader workers"]),  # 32 samples
    ("train.trackers=tensorbord", ["unknown tracker", "tensorboard"]),
    ("train.trackers=wandb", ["wandb", "not installed", "distill[wandb]"]),
    ("train.steps=-1", ["train.steps=-1", "at least 1"]),
    ("student.name=resnet_nope", ["unknown model", "resnet_nope"]),
    ("teacher.std=[1,0,1]", ["teacher.std"]),
    ("optim.betas=[0.9,1.5]", ["optim.betas"]),
    ("data.root=missing", ["missing"]),
])
def test_user_errors_are_one_line(world, tmp_path, override, words):
    if "wandb" in override:
        pytest.importorskip("accelerate")
        from accelerate.utils import is_wandb_available

        if is_wandb_available():
            pytest.skip("wandb is installed here")
    outcome, err = run("distill.pretrain", [recipe(world, "distill.pretrain"), f"output_dir={tmp_path / 'err'}", override])
    assert outcome == "exit 2" and err.startswith("error: ") and "Traceback" not in err
    for w in words:
        assert w in err, (override, err)


def test_trackers_as_a_bare_name_or_commas(world):
    from distill.config import load_pretrain_config

    base = [recipe(world, "distill.pretrain")]
    assert list(load_pretrain_config(base + ["train.trackers=jsonl"]).train.trackers) == ["jsonl"]
    assert list(load_pretrain_config(base + ["train.trackers=tensorboard,jsonl"]).train.trackers) == ["tensorboard", "jsonl"]
    assert list(load_pretrain_config(base + ["train.trackers="]).train.trackers) == []
    assert list(load_pretrain_config(base + ["optim.betas=0.8,0.9"]).optim.betas) == [0.8, 0.9]


def test_traceback_on_request(world, monkeypatch):
    """DISTILL_TRACEBACK=1 lets a user error through, for a bug report."""
    from distill.config import ConfigError

    monkeypatch.setenv("DISTILL_TRACEBACK", "1")
    with pytest.raises(ConfigError, match="train.steps"):
        run("distill.pretrain", [recipe(world, "distill.pretrain"), "train.steps=0"])


# ---- --help and recipes of another entry point ------------------------------------------------------------


def help_of(module: str, *argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--help", *argv])
    assert e.value.code == 0
    return out.getvalue()


@pytest.mark.parametrize("module, mine, theirs", [
    ("distill.pretrain", ["demo", "mnv4_conv_s", "repvit_m1_1"], ["det_demo", "curate_demo", "label_demo"]),
    ("distill.finetune_det", ["det_demo", "rtdetr_mnv4_conv_s"], ["demo", "curate_d3", "label_mnv4"]),
    ("distill.curate", ["curate_demo", "curate_d3"], ["demo", "det_demo", "label_demo"]),
    ("distill.label_views", ["label_demo", "label_mnv4"], ["demo", "det_demo", "curate_demo"]),
])
def test_help_lists_usage_own_recipes_and_keys(module, mine, theirs):
    text = help_of(module)
    assert text.startswith(f"usage: accelerate launch {module.replace('.', '/')}.py recipe=NAME")
    assert ENTRY_POINTS[module].command in text
    recipes = text.split("recipes:\n")[1].split("\n\n")[0]
    listed = {line.split()[0] for line in recipes.splitlines()}
    assert set(mine) <= listed and not set(theirs) & listed
    keys = text.split("keys (")[1]
    for key in schema_keys(ENTRY_POINTS[module].schema)[1:4]:  # every key has a row with its type and default
        row = next(line for line in keys.splitlines() if line.split()[:1] == [key.key])
        assert key.type.replace("Optional[", "").rstrip("]").split("[")[0] in row


def test_help_rows_carry_type_default_range_and_comment():
    text = help_of("distill.pretrain")
    row = next(line for line in text.splitlines() if line.split()[:1] == ["train.steps"])
    assert row.split()[1:5] == ["int", "or", "null", "null"] and "at least 1" in row and "overrides epochs" in row
    row = next(line for line in text.splitlines() if line.split()[:1] == ["teacher.mode"])
    assert "online|offline" in row
    row = next(line for line in text.splitlines() if line.split()[:1] == ["teacher.fit_steps"])
    assert "train the teacher on labels" in row  # a comment on the lines above the field


def test_help_with_a_recipe_shows_resolved_values():
    text = help_of("distill.pretrain", "recipe=demo", "train.steps=7")
    rows = {line.split()[0]: line for line in text.split("keys of recipe demo")[1].splitlines()[1:] if line.strip()}
    assert rows["*train.steps"].split()[4] == "7"  # int or null 7
    assert rows["*data.mix"].split()[2] == "demo"
    assert rows["*teacher.fit_steps"].split()[2] != "0"  # the demo's teacher fit, shortened by this key
    assert "train.seed" in rows  # unchanged keys carry no mark


def test_help_with_a_bad_value_is_one_line():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        importlib.import_module("distill.pretrain").main(["--help", "recipe=demo", "train.steps=x"])
    assert e.value.code == 2 and err.getvalue().startswith("error: ") and "train.steps" in err.getvalue()


@pytest.mark.parametrize("module, recipe_name, owner", [
    ("distill.pretrain", "det_demo", "distill/finetune_det.py"),
    ("distill.pretrain", "curate_demo", "distill/curate.py"),
    ("distill.finetune_det", "demo", "distill/pretrain.py"),
    ("distill.curate", "label_demo", "distill/label_views.py"),
    ("distill.label_views", "mnv4_conv_s", "distill/pretrain.py"),
])
def test_recipe_of_another_entry_point_names_it(module, recipe_name, owner):
    outcome, err = run(module, [f"recipe={recipe_name}"])
    assert outcome == "exit 2"
    kind = ENTRY_POINTS[owner.replace("/", ".")[:-3]].kind
    assert err.strip() == f"error: {recipe_name} is {kind} recipe: use {owner} ({ENTRY_POINTS[owner.replace('/', '.')[:-3]].command})"


def test_field_comments_read_from_the_schema_source():
    comments = field_comments(PretrainConfig.__dataclass_fields__["train"].default_factory().__class__)
    assert comments["steps"].startswith("optimizer steps")
    assert "max_bad_steps" in comments and "epochs" not in comments  # a field without a comment has none


def test_readme_says_which_key_shortens_the_demo_teacher():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    setup = readme.split("\n## The demo")[1].split("\n## ")[0]
    assert "--help" in setup and "teacher.fit_steps" in setup and "train.steps" in setup
