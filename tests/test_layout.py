"""Imports run downwards only: errors -> engine -> config / losses -> data -> models -> detection / passes / plan /
feature objective -> export -> entry points. Every import counts, those inside functions too, so a circle cannot hide in a late import."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "distill"

# lowest first; a module belongs to the longest prefix listed
FLOORS = [
    ["distill.errors"],
    ["distill.engine"],
    ["distill.config", "distill.losses", "distill.feature_losses"],
    ["distill.data"],
    ["distill.models"],
    ["distill.detection", "distill.passes", "distill.plan", "distill.baseline", "distill.feature_objective",
     "distill.feature_plan"],
    ["distill.export"],
    ["distill.cli", "distill.commands", "distill.pretrain", "distill.finetune_det", "distill.curate",
     "distill.label_views", "distill.export.__main__", "distill.predict"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports (anywhere in its body)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        graph[name] = {m for m in found if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def floor(module: str) -> int:
    best = max(((len(prefix), i) for i, names in enumerate(FLOORS) for prefix in names
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} has no floor in FLOORS"
    return best[1]


def test_every_import_runs_downwards():
    upward = [f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
              for a, targets in imports().items() for b in targets if floor(b) > floor(a)]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph, state, circles = imports(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, circles


def test_the_two_old_knots_stay_untied():
    graph = imports()
    assert not [m for m in graph if m.startswith("distill.engine") and any(t.startswith("distill.models") for t in graph[m])]
    assert not [m for m, t in graph.items() if m.startswith("distill.export.") and m != "distill.export.__main__"
                and "distill.export.__main__" in t]
