"""Writes docs/reference.md, every key of every entry point, from the schema `--help` prints.

    python scripts/make_reference.py            # rewrites docs/reference.md
    python scripts/make_reference.py --check    # exit 1 if the committed page differs from what the schema gives

The rows come from `distill.cli.key_rows`, the function behind `--help`, so the page and the command line cannot
disagree; tests/test_docs.py fails when the page is stale.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from distill.cli import ENTRY_POINTS, EntryPoint, key_rows
from distill.config import RECIPE_DIR, recipe_names

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "reference.md"
REGENERATE = "python scripts/make_reference.py"

HEADER = f"""# Reference: every key of every entry point

Generated from the configuration schema by `{REGENERATE}`: do not edit by hand (a test compares this
page with the schema). The same table, with a recipe's resolved values, is `--help [recipe=NAME key=value ...]`
of each entry point. `recipe=NAME` loads `recipes/NAME.yaml`, `key=value` overrides any key below (a list as `key=[a,b]`
or `key=a,b`); values are checked at load, before any work.
"""


def _cell(text: str) -> str:
    """Table-safe: a `|` would end the cell and `<name>` would read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def recipe_summary(path: Path) -> str:
    """The first sentence of a recipe's leading comment block (`--help` shows its first line)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def section(entry: EntryPoint) -> list[str]:
    doc = (importlib.import_module(entry.module).__doc__ or "").strip().split("\n\n")[0]
    lines = [
        f"## {entry.module.split('.')[-1]}",
        "",
        f"`accelerate launch {entry.script} recipe=NAME [key=value ...]` (installed: `{entry.command}`).",
        " ".join(doc.split()),
        "",
        "| recipe | what it is |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {_cell(recipe_summary(RECIPE_DIR / f'{name}.yaml'))} |"
              for name in recipe_names(RECIPE_DIR, entry.schema)]
    lines += ["", "| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
    for key, type_, default, allowed, note in key_rows(entry):
        allowed = f"`{allowed}`" if allowed else ""
        lines.append(f"| `{key}` | {_cell(type_)} | `{default}` | {_cell(allowed)} | {_cell(note)} |")
    return lines + [""]


def render() -> str:
    lines = [HEADER]
    for entry in ENTRY_POINTS.values():
        lines += section(entry)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            sys.exit(f"{PAGE.relative_to(ROOT)} is stale: run `{REGENERATE}`")
        return
    PAGE.parent.mkdir(exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
