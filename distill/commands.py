"""Console scripts of an installed package (`distill-pretrain`, ...): each runs one entry point's `main` and exits
0 on success. Under Accelerate, launch the module instead: `accelerate launch -m distill.pretrain recipe=...`.
Entry modules are imported on call, so that a command loads only what it runs."""
from __future__ import annotations

import importlib
import importlib.util

from distill.cli import ENTRY_POINTS, check_arguments


def _run(module: str) -> int:
    if module in ENTRY_POINTS:
        check_arguments(module)  # before the import: --help and mistakes need neither torch nor the training code
    result = importlib.import_module(module).main()
    return result if isinstance(result, int) else 0  # a summary dict is the run's result, not an exit status


def pretrain() -> int:
    return _run("distill.pretrain")


def finetune() -> int:
    return _run("distill.finetune_det")


def curate() -> int:
    return _run("distill.curate")


def label_views() -> int:
    return _run("distill.label_views")


def export() -> int:
    return _run("distill.export.__main__")


def shards() -> int:
    try:
        return _run("distill.scripts.folder_to_shards")  # an install ships scripts/ inside the package
    except ModuleNotFoundError as e:
        if e.name not in ("distill.scripts", "distill.scripts.folder_to_shards"):
            raise
    # an editable install or a checkout: scripts/ sits beside the package
    from distill.config import packaged_dir

    spec = importlib.util.spec_from_file_location("folder_to_shards", packaged_dir("scripts") / "folder_to_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main()
