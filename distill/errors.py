"""Mistakes a user can fix: the entry points print them as one line (`error: ...`, exit status 2), never as a
traceback. The lowest module of the package: anything may raise these, and the command line catches them
without importing the modules that raise them (torch's)."""
from __future__ import annotations

import importlib
from types import ModuleType


class ConfigError(ValueError):
    """A recipe or a command-line override that does not fit the schema, or a setting that cannot work."""


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses in a row: the run stops rather than train on garbage."""


class MissingExtra(ImportError):
    """An optional dependency that one feature needs is not installed."""


class MixError(ValueError):
    """A data mix file that does not describe a valid mix; the message names the file and key."""


class CocoFormatError(ValueError):
    """An instances JSON that does not follow the COCO format."""


class CheckpointMismatch(ValueError):
    """A state dict that does not fit the model it is loaded into, or a file that is not a safe checkpoint."""


class LaunchError(RuntimeError):
    """The processes do not form the run they were launched as."""


EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped early with a checkpoint, run it again with resume=auto


class Preempted(Exception):
    """Raised on every process once the run is checkpointed at the agreed stop; exits with EXIT_REQUEUE."""

    def __init__(self, where: str, then: str = "its checkpoint is written: continue with resume=auto"):
        super().__init__(f"stopped on a signal {where}; {then}")


class CollectiveTimeout(RuntimeError):
    """A collective with the other processes did not complete within the recipe's timeout."""


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """`module`, imported; or MissingExtra naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise MissingExtra(f"{needed_for} needs {package}, which is not installed: "
                           f"pip install 'distill[{extra}]'") from None
