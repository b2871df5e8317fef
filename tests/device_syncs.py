"""Counting the calls that would make the host wait for a GPU, on a machine without one.

On the CPU nothing waits, so each tensor is treated as if the training device were a GPU: a tensor lives on
the host when it was made there (a factory or `torch.as_tensor` without `device=`, `.cpu()`, `.to("cpu")`, or
an operation on host tensors only), and on the device otherwise: whatever existed before the count began
(parameters, loader batches: the stricter reading) and anything created with `device=` (the step's code
passes `accelerator.device`, the CPU here but a GPU in a real run). On that reading these calls are counted, with the (name, file, function) of their caller:

- a device value read by the host: `item`, `tolist`, `numpy`, `cpu`, `.to("cpu")`, `bool` / `float` / `int` /
  `index` of a tensor (`if t.any()`, `range(t)`), printing one;
- an operation whose output size depends on device values: `nonzero`, `argwhere`, one-argument `where`,
  `masked_select`, `unique`, `bincount`, indexing (reading or writing) with a boolean mask, `repeat_interleave`
  by a device tensor without `output_size`; `equal` / `allclose` / `is_nonzero` (they answer a Python bool);
- a blocking copy to the device: `torch.tensor` / `torch.as_tensor` / `new_tensor` of host data with a device,
  `.to(device)` / `.cuda()` / `copy_` of a host tensor without `non_blocking=True`, a host tensor written into
  a device one; a factory sized by a device tensor.

A host tensor copied with `non_blocking=True` is not counted (on a GPU it must be pinned first, which the
code does where CUDA is available). Calls made inside a `torch.nn.functional` function are not seen, only the
function itself.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

HOST = "_made_on_host"
TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep

READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__complex__",
         "__repr__", "__format__", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
         "bincount", "equal", "allclose", "is_nonzero"}
FROM_DATA = {"tensor", "as_tensor", "asarray"}
SIZED = {"arange", "linspace", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm"}
LIKE_SELF = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}


def on_host(t: torch.Tensor) -> bool:
    return getattr(t, HOST, False)


def _tensors(*trees) -> list[torch.Tensor]:
    return [t for t in tree_leaves(list(trees)) if isinstance(t, torch.Tensor)]


def _to_target(args, kwargs) -> str | None:
    """Where `Tensor.to(...)` sends a tensor: "host" (the string "cpu"), "device" (any torch.device or index:
    the step names its device so), the place of a tensor argument, or None (a dtype change only)."""
    for a in (kwargs.get("device"), *args[1:]):
        if isinstance(a, str):
            return "host" if torch.device(a).type == "cpu" else "device"
        if isinstance(a, (torch.device, int)) and not isinstance(a, bool):
            return "device"
        if isinstance(a, torch.Tensor):
            return "host" if on_host(a) else "device"
    return None


def _non_blocking(args, kwargs) -> bool:
    return bool(kwargs.get("non_blocking")) or any(a is True for a in args[1:])


class CountSyncs(TorchFunctionMode):
    """While active, `calls` gains (what, file, function) for each call that would wait for a GPU."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str, str]] = []

    def record(self, what: str) -> None:
        frame = sys._getframe(2)
        while frame is not None and (frame.f_code.co_filename.startswith(TORCH_DIR)
                                     or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        where = (Path(frame.f_code.co_filename).name, frame.f_code.co_name) if frame else ("?", "?")
        self.calls.append((what, *where))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = _tensors(args, kwargs)
        if name == "__get__":  # a property (shape, device, grad...): nothing to count or to place
            return func(*args, **kwargs)
        what = self.would_wait(name, args, kwargs, inputs)
        if what:
            self.record(what)
        out = func(*args, **kwargs)
        return self.place(name, args, kwargs, inputs, out)

    @staticmethod
    def would_wait(name, args, kwargs, inputs) -> str | None:
        on_device = [t for t in inputs if not on_host(t)]
        if name in READS and on_device:
            return name
        if name == "where" and len(args) + len(kwargs) == 1 and on_device:
            return "where"
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            masks = [t for t in _tensors(args[1]) if t.dtype in (torch.bool, torch.uint8)]
            if masks and (not on_host(args[0]) or any(not on_host(m) for m in masks)):
                return f"{name}[bool mask]"
            value = args[2] if name == "__setitem__" and len(args) > 2 else None
            if isinstance(value, torch.Tensor) and on_host(value) and not on_host(args[0]) and value.dim():
                return "__setitem__(host tensor)"
        if name == "repeat_interleave" and "output_size" not in kwargs:
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            if isinstance(repeats, torch.Tensor) and not on_host(repeats) and repeats.numel() > 1:
                return "repeat_interleave"
        if name in FROM_DATA and kwargs.get("device") is not None:
            data = args[0] if args else kwargs.get("data")
            if not (isinstance(data, torch.Tensor) and not on_host(data)):
                return f"{name}(host data, device=)"
        if name == "new_tensor" and (not on_host(args[0]) or kwargs.get("device") is not None):
            return "new_tensor"
        if name in SIZED and on_device:
            return f"{name}(sized by a device tensor)"
        if name in ("to", "cuda") and inputs and isinstance(args[0], torch.Tensor):
            target = "device" if name == "cuda" else _to_target(args, kwargs)
            if target == "host" and not on_host(args[0]):
                return "to(cpu)"
            if target == "device" and on_host(args[0]) and not _non_blocking(args, kwargs):
                return f"{name}(device) blocking"
        if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
            if on_host(args[0]) != on_host(args[1]) and not _non_blocking(args[1:], kwargs):
                return "copy_ across host and device"
        return None

    @staticmethod
    def place(name, args, kwargs, inputs, out):
        """Marks each output tensor host or device; a move between them that torch skipped on the CPU (it
        returns the same tensor) gives a copy, as a GPU would."""
        if name == "cpu":
            host = True
        elif name in ("to", "cuda"):
            target = "device" if name == "cuda" else _to_target(args, kwargs)
            host = on_host(args[0]) if target is None else target == "host"
        elif kwargs.get("device") is not None:
            host = False
        elif name in LIKE_SELF:
            host = on_host(args[0])
        else:
            host = all(on_host(t) for t in inputs)
        if isinstance(out, torch.Tensor) and inputs and out is inputs[0] and on_host(out) != host \
                and name in ("cpu", "to", "cuda"):
            with torch._C.DisableTorchFunction():
                out = out.clone()
        for t in _tensors(out):
            if on_host(t) != host:
                setattr(t, HOST, host)
        return out
