"""An entry point whose process UNREADABLE_RANK cannot read the checkpoint file named UNREADABLE_FILE, as a
network file system failing on one node would (EIO); the other processes read it. For the resume tests:

    UNREADABLE_RANK=1 UNREADABLE_FILE=ckpt-00000004.pt ENTRY=distill/pretrain.py python unreadable_checkpoint.py ...
"""
import errno
import os
import runpy
from pathlib import Path

import torch

if os.environ.get("RANK", "0") == os.environ["UNREADABLE_RANK"]:
    load = torch.load

    def failing_load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and Path(f).name == os.environ["UNREADABLE_FILE"]:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(f))
        return load(f, *args, **kwargs)

    torch.load = failing_load

runpy.run_path(os.environ["ENTRY"], run_name="__main__")
