"""What the code imports is declared; what one optional feature needs is an extra, and its absence is a
one-line message naming that extra."""
from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import io
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_names(specs) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def imported_top_level() -> set[str]:
    names = set()
    for path in [*(ROOT / "distill").rglob("*.py"), ROOT / "scripts" / "folder_to_shards.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"distill", "__future__"}


def test_every_imported_package_is_declared():
    extras = PROJECT["optional-dependencies"]
    declared = requirement_names(PROJECT["dependencies"]) | requirement_names(
        s for name, specs in extras.items() if name != "dev" for s in specs)
    by_module = importlib.metadata.packages_distributions()
    undeclared = {m: by_module.get(m) for m in imported_top_level()
                  if not {d.lower().replace("_", "-") for d in by_module.get(m, [m])} & declared}
    assert not undeclared, f"imported but not declared (module: distributions): {undeclared}"


def test_floors_caps_and_extras():
    deps = {re.split(r"[<>=!~; ]", s, maxsplit=1)[0].lower(): s for s in PROJECT["dependencies"]}
    assert {"opencv-python-headless", "pyyaml", "braceexpand"} <= set(deps)
    assert "<2.1" in deps["albumentations"] and ">=2.0.1" in deps["albumentations"]  # 2.0.x: MIT; 2.1+: AGPL
    assert ">=2.5" in deps["torch"] and ">=1.0.16" in deps["timm"]
    assert "matplotlib" not in deps and "transformers" not in deps  # optional features: extras
    extras = {k: requirement_names(v) for k, v in PROJECT["optional-dependencies"].items()}
    assert "matplotlib" in extras["plot"] and "transformers" in extras["hf"] and "wandb" in extras["wandb"]
    assert {"distill-pretrain", "distill-finetune", "distill-export", "distill-shards"} <= set(PROJECT["scripts"])


def test_curation_without_matplotlib_names_the_extra(monkeypatch):
    from distill import curate

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        curate.main(["recipe=curate_demo"])
    assert e.value.code == 2
    assert err.getvalue().strip() == ("error: the curation report (report.png) needs matplotlib, which is not "
                                      "installed: pip install 'distill[plot]'")


def test_hf_export_without_transformers_names_the_extra(monkeypatch, tmp_path):
    from distill.export.__main__ import main

    monkeypatch.setitem(sys.modules, "transformers", None)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--to", "hf-rtdetr", "--out", str(tmp_path / "hf")])
    assert e.value.code == 2 and "pip install 'distill[hf]'" in err.getvalue() and "--to hf-rtdetr" in err.getvalue()
