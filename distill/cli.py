"""The command line shared by the entry points: `-h/--help`, recipes that belong to another entry point, and the
one handler that prints every user error as a single line.

    @command("pretrain")
    def main(argv=None): ...

A recipe belongs to the entry point whose schema it fits; `--help` lists those recipes and the schema's keys
with their types, defaults and allowed values (`--help recipe=NAME [key=value ...]`: the resolved values).
"""
from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import inspect
import io
import os
import re
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from omegaconf import OmegaConf

from distill.config import (
    PRETRAIN_CHOICES,
    PRETRAIN_RANGES,
    RECIPE_DIR,
    PretrainConfig,
    Range,
    load_pretrain_config,
    recipe_fits,
    recipe_names,
    recipe_path,
    schema_keys,
)
from distill.detection.recipe import DET_CHOICES, DET_RANGES, DetConfig, load_det_config
from distill.errors import (
    EXIT_REQUEUE,
    CheckpointMismatch,
    CocoFormatError,
    CollectiveTimeout,
    ConfigError,
    LaunchError,
    MissingExtra,
    MixError,
    NonFiniteLoss,
    Preempted,
    require,
)
from distill.passes.recipe import (
    CURATE_CHOICES,
    CURATE_RANGES,
    LABEL_CHOICES,
    LABEL_RANGES,
    CurateConfig,
    LabelConfig,
    load_curate_config,
    load_label_config,
)

# What a user can fix. Anything else is a bug, and keeps its traceback.
USER_ERRORS = (ConfigError, MissingExtra, MixError, CocoFormatError, CheckpointMismatch, NonFiniteLoss, LaunchError,
               OSError)
HELP = ("-h", "--help")
DEBUG_ENV = "DISTILL_TRACEBACK"  # set to 1 to see the traceback of a user error


@dataclass(frozen=True)
class EntryPoint:
    module: str  # distill.pretrain
    command: str  # the console script
    kind: str  # "a pretraining": what its recipes are called
    schema: type
    load: Callable[[Sequence[str]], Any]
    check: Callable[[Sequence[str]], Any]  # `load` less what needs torch: the arguments' first look
    choices: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    ranges: Mapping[str, Range] = field(default_factory=dict)

    @property
    def script(self) -> str:
        return self.module.replace(".", "/") + ".py"


ENTRY_POINTS = {
    e.module: e
    for e in (
        EntryPoint("distill.pretrain", "distill-pretrain", "a pretraining", PretrainConfig, load_pretrain_config,
                   functools.partial(load_pretrain_config, trackers=False), PRETRAIN_CHOICES, PRETRAIN_RANGES),
        EntryPoint("distill.finetune_det", "distill-finetune", "a detection", DetConfig, load_det_config,
                   functools.partial(load_det_config, trackers=False), DET_CHOICES, DET_RANGES),
        EntryPoint("distill.curate", "distill-curate", "a curation", CurateConfig, load_curate_config,
                   load_curate_config, CURATE_CHOICES, CURATE_RANGES),
        EntryPoint("distill.label_views", "distill-label", "an offline-labelling", LabelConfig, load_label_config,
                   load_label_config, LABEL_CHOICES, LABEL_RANGES),
    )
}


@contextlib.contextmanager
def user_errors():
    """A user error becomes `error: <message>` on stderr and exit status 2; a run stopped by a signal exits with
    EXIT_REQUEUE after its checkpoint, and a collective that timed out says which process fell behind (status 1)."""
    try:
        yield
    except Preempted as e:
        print(e, file=sys.stderr)
        raise SystemExit(EXIT_REQUEUE) from None
    except (*USER_ERRORS, CollectiveTimeout) as e:
        if os.environ.get(DEBUG_ENV):
            raise
        sys.stderr.write(f"error: {e}\n")  # one write: processes sharing a log do not interleave within it
        sys.stderr.flush()
        raise SystemExit(1 if isinstance(e, CollectiveTimeout) else 2) from None


def command(module: str, requires: Optional[Mapping[str, tuple[str, str]]] = None):
    """Decorates an entry point's `main(argv=None, ...)`: `--help`, the recipe's entry point, the optional
    packages it `requires` ({module: (extra, what needs it)}), and user errors."""
    entry = ENTRY_POINTS[module]

    def decorate(main):
        @functools.wraps(main)
        def wrapper(argv=None, *args, **kwargs):
            argv = list(sys.argv[1:] if argv is None else argv)
            with user_errors():
                answer_help(entry, argv, sys.modules[main.__module__].__doc__)
                check_recipe_belongs(entry, argv)
                for name, (extra, needed_for) in (requires or {}).items():
                    require(name, extra, needed_for)
                try:
                    return main(argv, *args, **kwargs)
                finally:
                    from distill.engine.preemption import STOP, end_loader_workers  # loaded with the entry point

                    STOP.uninstall()
                    end_loader_workers()

        return wrapper

    return decorate


def check_arguments(module: str, argv: Optional[Sequence[str]] = None) -> None:
    """`--help`, and a mistake in the arguments (`error: ...`, exit status 2), answered before the entry point
    loads torch and its training code: an entry module calls this above its heavy imports when run as a
    script, the console scripts before they import the module. Valid arguments return, to be read again by
    `main` (reading a recipe takes milliseconds), which also checks that the trackers named are installed."""
    entry = ENTRY_POINTS[module]
    argv = list(sys.argv[1:] if argv is None else argv)
    with user_errors():
        answer_help(entry, argv, module_doc(module))
        check_recipe_belongs(entry, argv)
        entry.check(argv)


def answer_help(entry: EntryPoint, argv: Sequence[str], doc: Optional[str]) -> None:
    if any(a in HELP for a in argv):
        print(help_text(entry, [a for a in argv if a not in HELP], doc))
        raise SystemExit(0)


def module_doc(module: str) -> Optional[str]:
    """A module's docstring, read from its source without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text()), clean=False)


def check_recipe_belongs(entry: EntryPoint, argv: Sequence[str]) -> None:
    """A recipe of another entry point is named as such, rather than failing on its first foreign key."""
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("recipe=")), None)
    if not name:
        return
    path = recipe_path(name, RECIPE_DIR, entry.schema)
    if recipe_fits(entry.schema, path):
        return
    owners = [e for e in ENTRY_POINTS.values() if e is not entry and recipe_fits(e.schema, path)]
    if owners:
        raise ConfigError(f"{name} is {owners[0].kind} recipe: use {owners[0].script} ({owners[0].command})")


# --------------------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------------------


def help_text(entry: EntryPoint, argv: Sequence[str], doc: Optional[str] = None) -> str:
    """Usage, what the entry point does, its recipes and its keys; with `recipe=NAME`, the resolved values."""
    cfg = entry.check(argv) if argv else None
    summary = (doc or "").strip().split("\n\n")[0]
    recipes = recipe_names(RECIPE_DIR, entry.schema, values=False)
    out = [
        f"usage: accelerate launch {entry.script} recipe=NAME [key=value ...]",
        f"       {entry.command} recipe=NAME [key=value ...]     (installed; or accelerate launch -m {entry.module})",
        f"       {entry.command} --help [recipe=NAME [key=value ...]]",
        "",
        summary,
        "",
        f"recipe=NAME loads {RECIPE_DIR}/NAME.yaml (or recipe=path/to/file.yaml); key=value overrides any key below",
        "(a list as key=[a,b] or key=a,b). The resolved configuration is saved as config.yaml in the output folder.",
        "",
        "recipes:",
        *_columns([(name, _first_comment(RECIPE_DIR / f"{name}.yaml")) for name in recipes]),
        "",
    ]
    if cfg is None:
        out.append("keys (type, default, allowed values; --help recipe=NAME shows a recipe's values):")
    else:
        out.append(f"keys of recipe {cfg.recipe} (type, value, allowed values; * differs from the default):")
    out += _columns(key_rows(entry, cfg))
    out += ["", f"A mistake prints one line (`error: ...`, exit status 2); {DEBUG_ENV}=1 shows its traceback."]
    return "\n".join(out)


def key_rows(entry: EntryPoint, cfg: Any = None) -> list[tuple[str, str, str, str, str]]:
    """(key, type, value, allowed values, comment) of every key of an entry point: the defaults, or a resolved
    configuration's values with `*` before the keys that differ. `--help` and docs/reference.md both show these."""
    rows = []
    comments = {}
    for key in schema_keys(entry.schema):
        if key.key == "recipe":
            continue
        if key.owner not in comments:
            comments[key.owner] = field_comments(key.owner)
        note = comments[key.owner].get(key.name, "")
        if cfg is None:
            value, marker = key.default, ""
        else:
            value = OmegaConf.select(cfg, key.key)
            value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            marker = "*" if value != key.default else ""
        rows.append((f"{marker}{key.key}", _type(key.type), _value(value), _allowed(key.key, entry), note))
    return rows


def _allowed(key: str, entry: EntryPoint) -> str:
    if key in entry.choices:
        return "|".join("null" if c is None else str(c) for c in entry.choices[key])
    if key in entry.ranges:
        allowed = entry.ranges[key]
        return allowed.describe() + (f" x{allowed.length}" if allowed.length else "")
    return ""


def _type(annotation: str) -> str:
    match = re.fullmatch(r"Optional\[(.*)\]", annotation)
    return f"{match.group(1)} or null" if match else annotation


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return "''"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_value, value)) + "]"
    return str(value)


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return ["  (none)"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of a schema dataclass, from its source: the one on the field's line, else the
    comment lines just above it."""
    try:
        source = "".join(inspect.getsourcelines(cls)[0])
    except (OSError, TypeError):  # no source (a frozen or zipped install): the help shows no comments
        return {}
    comments, above, line_field = {}, [], {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        row, col = tok.start
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if row in line_field:
                comments[line_field[row]] = text
            else:
                above.append(text)
        elif tok.type == tokenize.NAME and col == 4 and row not in line_field:
            line_field[row] = tok.string
            if above:
                comments[tok.string] = " ".join(above)
                above = []
        elif tok.type == tokenize.NL and col == 0:
            above = []  # a blank line ends a comment block
    return comments
