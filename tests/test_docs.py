"""The documentation holds what the code does: every command of a ```bash block in README.md and docs/*.md either
runs here or says why not, docs/reference.md is what the schema gives now, and every link lands.

How a command runs here, all in one interpreter (one import of torch), in a temporary folder:
- an entry point's command with `dry_run=N` or `--help` runs as written (neither reads data nor needs a GPU);
- any other command of an entry point runs as `--help` with the same recipe and keys: the recipe is read and
  every key and value checked, as the run would at its start, without training;
- anything else carries a marker comment saying why it is not run here: `# needs ...` (a GPU, the hub, a
  cluster, data, a run folder, the network) or `# covered by tests/<file>.py`.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^(needs \S.*|covered by (tests/\S+\.py)\b.*)$")  # a command's comment, `#` removed
SUITE = "python -m pytest"  # the test suite itself: the command these tests are run by
CONFIG_ENTRY_POINTS = ("distill.pretrain", "distill.finetune_det", "distill.curate", "distill.label_views")
OTHER_ENTRY_POINTS = ("distill.export", "distill.predict")  # argparse: only their --help runs here
CONSOLE_SCRIPTS = {"distill-pretrain": "distill.pretrain", "distill-finetune": "distill.finetune_det",
                   "distill-curate": "distill.curate", "distill-label": "distill.label_views",
                   "distill-export": "distill.export"}


@dataclass
class Command:
    where: str  # page:line
    text: str  # continuation lines joined, comment removed
    comment: str


def bash_commands(page: Path) -> list[Command]:
    """The commands of a page's ```bash blocks (indented ones in list items too), continuation lines joined."""
    out, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        fence = line.strip()
        if fence.startswith("```"):
            in_block = fence == "```bash" and not in_block
            continue
        if not in_block or (not pending and (not fence or fence.startswith("#"))):
            continue
        start = start if pending else number
        if fence.endswith("\\"):
            pending += fence[:-1] + " "
            continue
        text, _, comment = (pending + fence).partition(" #")
        out.append(Command(f"{page.relative_to(ROOT)}:{start}", " ".join(text.split()), comment.strip()))
        pending = ""
    return out


def job(cmd: Command):
    """(module, argv) that runs `cmd` here, or None where the command is not one of the entry points'."""
    words = shlex.split(cmd.text)
    if words[:2] == ["accelerate", "launch"]:
        words = words[2:]
    elif words and words[0] == "torchrun":
        words = words[next(i for i, w in enumerate(words) if w.endswith(".py")):]
    elif words and words[0] == "python":
        words = words[1:]
    if words and words[0] in CONSOLE_SCRIPTS:
        module, argv = CONSOLE_SCRIPTS[words[0]], words[1:]
    elif words[:1] == ["-m"] and len(words) > 1:
        module, argv = words[1], words[2:]
    elif words and words[0].startswith("distill/") and words[0].endswith(".py"):
        module, argv = words[0][:-3].replace("/", "."), words[1:]
    else:
        return None
    if module in OTHER_ENTRY_POINTS:
        return (module, argv) if argv == ["--help"] else None
    if module not in CONFIG_ENTRY_POINTS:
        return None
    runs_as_written = "--help" in argv or any(a.startswith("dry_run=") for a in argv)
    return module, argv if runs_as_written else ["--help", *argv]


def every_command() -> list[Command]:
    return [cmd for page in PAGES for cmd in bash_commands(page)]


def test_every_command_runs_here_or_says_why_not(tmp_path):
    commands = every_command()
    assert len(commands) > 20 and any(c.where.startswith("README.md") for c in commands)
    jobs, unexplained = [], []
    for cmd in commands:
        marker = MARKER.search(cmd.comment)
        if cmd.text.startswith(SUITE):
            continue
        if marker:
            covered = marker.group(2)
            assert covered is None or (ROOT / covered).is_file(), f"{cmd.where}: {covered} does not exist"
            continue
        found = job(cmd)
        if found is None:
            unexplained.append(f"{cmd.where}: {cmd.text}")
        else:
            jobs.append({"where": cmd.where, "module": found[0], "argv": found[1]})
    assert not unexplained, ("commands neither run by tests/test_docs.py nor marked `# needs ...` or "
                             "`# covered by tests/FILE.py`:\n" + "\n".join(unexplained))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, json.dumps(jobs)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    failed = [f"{r['where']}: exit {r['code']}: {r['said']}" for r in results if r["code"] != 0]
    assert not failed, "documented commands that fail:\n" + "\n".join(failed)
    assert len(results) == len(jobs)
    # nothing was written beside the temporary folder's own files (no run, no data)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_the_command_check_catches_a_wrong_key(tmp_path):
    """The `--help` form is a check, not a formality: a misspelt key or a value not allowed fails it."""
    jobs = [{"where": "x", "module": "distill.pretrain", "argv": ["--help", "recipe=demo", "train.stepz=5"]},
            {"where": "y", "module": "distill.finetune_det", "argv": ["--help", "recipe=det_demo", "data.format=voc"]}]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, json.dumps(jobs)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["code"] for r in results] == [2, 2], results
    assert "train.stepz" in results[0]["said"] and "data.format" in results[1]["said"], results


def test_markers_and_forms_are_read_as_documented():
    page = ROOT / "docs" / "cluster.md"
    by_text = {c.text: c for c in bash_commands(page)}
    assert job(by_text["torchrun --nproc_per_node 2 distill/pretrain.py recipe=demo"]) == (
        "distill.pretrain", ["--help", "recipe=demo"])
    sbatch = next(c for t, c in by_text.items() if t.startswith("scripts/slurm_pretrain.sbatch"))
    assert job(sbatch) is None and MARKER.search(sbatch.comment)
    joined = [c for c in bash_commands(ROOT / "docs" / "detection.md") if "init_from=" in c.text]
    assert joined and "model.backbone_checkpoint=runs/mnv4_conv_s" in joined[0].text  # continuation lines


def test_reference_page_is_what_the_schema_gives():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_reference
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    page = ROOT / "docs" / "reference.md"
    assert page.read_text() == make_reference.render(), (
        f"docs/reference.md is stale: run `{make_reference.REGENERATE}` and commit the page")
    text = page.read_text()
    for section in ("pretrain", "finetune_det", "curate", "label_views"):
        assert f"\n## {section}\n" in text
    assert "| `data.format` | str | `auto` | `auto\\|coco\\|yolo\\|roboflow\\|cvat\\|labelstudio` |" in text
    assert "| `distill.max_weight` |" in text


def slug(title: str) -> str:
    """GitHub's anchor of a heading."""
    title = re.sub(r"[^\w\- ]", "", title.strip().lower().replace("`", ""))
    return title.replace(" ", "-")


def test_links_land_on_files_and_headings():
    headings = {}
    for path in [*PAGES, ROOT / "BENCHMARKS.md"]:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a `# comment` in a block is no heading
        headings[path.resolve()] = {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page.resolve()
            if not dest.exists() or (anchor and anchor not in headings.get(dest, set())):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_readme_is_a_landing_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in ("pretraining", "data", "teacher_passes", "detection", "export", "cluster", "reference"):
        assert f"(docs/{page}.md" in readme, page


# --------------------------------------------------------------------------------------------------
# The runner: python tests/test_docs.py JOBS_JSON, in the folder the commands run in
# --------------------------------------------------------------------------------------------------


def run_jobs(jobs: list[dict]) -> list[dict]:
    results = []
    for j in jobs:
        module = importlib.import_module(j["module"] + (".__main__" if j["module"] == "distill.export" else ""))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.main(j["argv"])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception as e:  # noqa: BLE001 - reported with the command's place
                code, err = 1, io.StringIO(f"{type(e).__name__}: {e}")
        said = (err.getvalue().strip().splitlines() or [""])[-1][:300]
        results.append({"where": j["where"], "code": code, "said": said})
    return results


if __name__ == "__main__":
    print(json.dumps(run_jobs(json.loads(sys.argv[1]))))
