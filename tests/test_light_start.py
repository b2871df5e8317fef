"""`--help` and a mistake in the arguments are answered before any entry point loads torch, timm,
albumentations or OpenCV (seconds of start-up): each case runs in a fresh interpreter, as the user starts it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "albumentations", "cv2")

# how the entry point is started, what it is given, and the exit status it answers with
CASES = [
    *[(("script", f"distill/{name}.py"), argv, code)
      for name, recipe, seed in (("pretrain", "demo", "train.seed"), ("finetune_det", "det_demo", "train.seed"),
                                 ("curate", "curate_demo", "seed"), ("label_views", "label_demo", "seed"))
      for argv, code in ((["--help"], 0), (["--help", f"recipe={recipe}", f"{seed}=3"], 0),
                         ([f"recipe={recipe}", "no_such_key=1"], 2))],
    (("script", "distill/pretrain.py"), ["recipe=demo", "train.steps=x"], 2),
    (("script", "distill/pretrain.py"), ["recipe=det_demo"], 2),  # another entry point's recipe
    (("module", "distill.pretrain"), ["--help"], 0),
    (("module", "distill.finetune_det"), ["recipe=det_demo", "optim.lr=abc"], 2),
    (("module", "distill.export"), ["--help"], 0),
    (("module", "distill.export"), ["run", "--out", "x", "--to", "no_such_target"], 2),
    (("module", "distill.predict"), ["--help"], 0),
    (("module", "distill.predict"), ["run"], 2),
    (("script", "scripts/folder_to_shards.py"), ["--help"], 0),
    (("script", "scripts/folder_to_shards.py"), ["no_such_folder", "out"], 2),
    (("console", "pretrain"), ["--help"], 0),
    (("console", "finetune"), ["recipe=det_demo", "no_such_key=1"], 2),
]

PROBE = """
import json, runpy, sys
how, target, report, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
code = 0
try:
    if how == "console":
        sys.argv = [target, *argv]
        import distill.commands
        code = getattr(distill.commands, target)()
    elif how == "module":
        sys.argv = [target, *argv]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *argv]
        sys.path[0] = str(__import__("pathlib").Path(target).resolve().parent)  # as `python script.py` sets it
        runpy.run_path(target, run_name="__main__")
except SystemExit as stop:
    code = stop.code
with open(report, "w") as f:
    json.dump({"code": code, "loaded": [m for m in %r if m in sys.modules]}, f)
""" % (HEAVY,)


@pytest.mark.parametrize("how, argv, code", CASES, ids=lambda v: " ".join(v) if isinstance(v, (list, tuple)) else str(v))
def test_help_and_mistakes_load_no_heavy_module(tmp_path, how, argv, code):
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-c", PROBE, *how, str(report), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert report.exists(), done.stderr
    result = json.loads(report.read_text())
    assert result["code"] == code, done.stdout + done.stderr
    assert result["loaded"] == [], f"{' '.join(how)} {' '.join(argv)} loaded {result['loaded']}"
    if code == 0:
        assert "usage" in done.stdout.lower()
    else:
        assert "error" in done.stderr.lower() and "Traceback" not in done.stderr
