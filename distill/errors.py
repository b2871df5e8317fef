"""Mistakes a user can fix: the entry points print them as one line (`error: ...`, exit status 2), never as a
traceback. The lowest module of the package: anything may raise these."""
from __future__ import annotations

import importlib
from types import ModuleType


class ConfigError(ValueError):
    """A recipe or a command-line override that does not fit the schema, or a setting that cannot work."""


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses in a row: the run stops rather than train on garbage."""


class MissingExtra(ImportError):
    """An optional dependency that one feature needs is not installed."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """`module`, imported; or MissingExtra naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise MissingExtra(f"{needed_for} needs {package}, which is not installed: "
                           f"pip install 'distill[{extra}]'") from None
