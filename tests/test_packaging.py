"""A non-editable install works outside the checkout: the wheel carries every module, the recipes and the data
mixes; its console scripts run. Built and installed offline (no build isolation, no index, no dependencies:
a fresh virtual environment sees this interpreter's packages through a path file, not the checkout)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("distill", "recipes", "data_mixes", "scripts")


def sh(*cmd, cwd, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the checkout (the checkout itself stays free of build output)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in SHIPPED:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
       "-w", work / "dist", src, cwd=work)
    (found,) = (work / "dist").glob("distill-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; torch & co. come from this interpreter's
    site-packages (listed in a .pth file, so that their editable-install hooks, ours included, stay out)."""
    env = tmp_path_factory.mktemp("venv") / "env"
    sh(sys.executable, "-m", "venv", "--without-pip", env, cwd=env.parent)
    python = env / "bin" / "python"
    purelib = sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=env).stdout.strip()
    outer = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (Path(purelib) / "outer.pth").write_text("\n".join(outer) + "\n")
    sh(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=env.parent)
    return env


def test_wheel_holds_every_module_recipe_and_mix(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, pattern, inside in (("distill", "**/*.py", "distill"), ("recipes", "*.yaml", "distill/recipes"),
                                    ("data_mixes", "*.yaml", "distill/data_mixes"),
                                    ("scripts", "folder_to_shards.py", "distill/scripts")):
        files = sorted((ROOT / folder).glob(pattern))
        assert files
        missing = [str(f) for f in files if f"{inside}/{f.relative_to(ROOT / folder).as_posix()}" not in names]
        assert not missing, f"not in the wheel: {missing}"


def test_installed_entry_point_runs_outside_the_checkout(venv, tmp_path):
    """`distill-pretrain --help` from an unrelated folder: the package, its recipes and mixes come from the
    environment, not from a checkout."""
    out = sh(venv / "bin" / "distill-pretrain", "--help", cwd=tmp_path).stdout
    assert out.startswith("usage:")
    recipes = out.split("recipes:\n")[1].split("\n\n")[0]
    assert {"demo", "mnv4_conv_s"} <= {line.split()[0] for line in recipes.splitlines()}
    assert "train.steps" in out and "det_demo" not in recipes
    probe = ("import distill, distill.config as c, distill.data.mix as m\n"
             "cfg = c.load_pretrain_config(['recipe=mnv4_conv_s'])\n"
             "mix = m.DataMix.load(cfg.data.mix, 'data')\n"
             "print(distill.__file__, c.RECIPE_DIR, m.MIX_DIR, ','.join(mix.source_names), sep='\\n')")
    module, recipe_dir, mix_dir, sources = sh(venv / "bin" / "python", "-c", probe, cwd=tmp_path).stdout.split()
    for path in (module, recipe_dir, mix_dir):
        assert Path(path).is_relative_to(venv) and not Path(path).is_relative_to(ROOT), path
    assert sources.split(",") == ["d1", "d2", "d3"]


def test_console_scripts_exist_and_answer(venv, tmp_path):
    for command in ("distill-finetune", "distill-curate", "distill-label", "distill-export", "distill-shards"):
        assert (venv / "bin" / command).exists(), command
    assert "--out" in sh(venv / "bin" / "distill-export", "--help", cwd=tmp_path).stdout
    assert "--maxcount" in sh(venv / "bin" / "distill-shards", "--help", cwd=tmp_path).stdout


@pytest.mark.parametrize("command, words", [("pretrain", "recipe=NAME"), ("shards", "--maxcount")])
def test_console_scripts_run_from_a_checkout_too(monkeypatch, capsys, command, words):
    """An editable install or a bare checkout: scripts/ sits beside the package, not in it."""
    from distill import commands

    monkeypatch.setattr(sys, "argv", [f"distill-{command}", "--help"])
    with pytest.raises(SystemExit) as e:
        getattr(commands, command)()
    assert e.value.code == 0 and words in capsys.readouterr().out
