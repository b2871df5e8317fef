"""The processes of a run: started once, checked to form one run, and a way to share a decision among them."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch

from distill.errors import LaunchError


def start_processes(timeout_s: Optional[float] = None):
    """Accelerate's process state for this launch, the same one every Accelerator of the run reuses; its
    collectives give up after `timeout_s` (the first call of a launch decides).

    Launched as several processes (torchrun, accelerate launch) on a machine without CUDA, the processes join
    one gloo group: Accelerate would otherwise start each as a single-process run of its own, N copies that
    all train and write into one folder. A launch whose processes still do not form one run stops here."""
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # The training group waits a little longer than the stop agreement's gloo group (engine/preemption.py), whose
    # timeout then fires first: on GPUs NCCL's watchdog would end the process without saying who is missing
    timeout = {"timeout": timedelta(seconds=timeout_s + min(60.0, 0.05 * timeout_s))} if timeout_s else {}
    state = PartialState(cpu=launched > 1 and not torch.cuda.is_available(), **timeout)
    if state.num_processes != launched:
        raise LaunchError(
            f"launched as {launched} processes (WORLD_SIZE) but they formed a run of {state.num_processes}; "
            f"check the launcher's settings (accelerate config, MASTER_ADDR / MASTER_PORT)"
        )
    return state


def end_processes() -> None:
    """The launch's runs are over: leave the process group (nothing to do for a single process)."""
    from accelerate import PartialState

    PartialState().destroy_process_group()


def broadcast_from_main(value: Any) -> Any:
    """The main process's `value`, on every process (a picklable object)."""
    from accelerate.utils import broadcast_object_list

    from accelerate import PartialState

    if PartialState().num_processes == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


def gather_from_all(value: Any) -> list:
    """Every process's `value` (a picklable object), in process order, on every process."""
    from accelerate.utils import gather_object

    return gather_object([value])


def match_gradient_buckets(model: torch.nn.Module, forward: Callable[[], Any]) -> None:
    """Give a resumed DDP model the gradient buckets the uninterrupted run had.

    DDP lays its gradient buckets out anew after its first synchronised backward, in the order the gradients
    became ready; an all-reduce's rounding depends on where a value sits in its bucket. A resumed run would
    train its first step on the initial layout where the uninterrupted run used the rebuilt one, and drift by
    a rounding. One throwaway forward (`forward()`, through `model`) and backward here, with the random
    generators, buffers and gradients put back afterwards, makes the next forward rebuild the buckets as the
    uninterrupted run did."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return
    buffers = [b.detach().clone() for b in model.module.buffers()]
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        (sum(t.float().sum() for t in _float_tensors(forward())) * 0).backward()
    with torch.no_grad():
        for b, saved in zip(model.module.buffers(), buffers):
            b.copy_(saved)
    model.zero_grad(set_to_none=True)


def _float_tensors(output: Any) -> Iterator[torch.Tensor]:
    """The floating-point tensors in a model's output (nested dicts, lists and tuples)."""
    if torch.is_tensor(output):
        if output.is_floating_point() and output.requires_grad:
            yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from _float_tensors(value)
    elif isinstance(output, (list, tuple)):
        for value in output:
            yield from _float_tensors(value)


def share_buffers(accelerator, *modules: torch.nn.Module) -> None:
    """Every process takes process 0's buffers (batch-norm statistics). DDP hands them out at the start of each
    training forward, which then updates them from the local batch: after training they differ a little per
    process, and the checkpoint holds process 0's. Evaluating with those on every process makes the reported
    accuracy the saved model's."""
    if accelerator.num_processes > 1:
        for module in modules:
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)
