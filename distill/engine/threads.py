"""torch's intra-op threads, chosen to fit the machine rather than torch's default of one per core.

Every process of a node and each of its loader workers wants a core: torch's default (all cores, in every
process) oversubscribes a node that runs several processes, and a CPU run sharing its cores with other work
slows down many times over (threads that spin waiting for each other). The entry points set, once the
arguments are read, the cores this process may use (its CPU affinity) divided by the processes on this node
(LOCAL_WORLD_SIZE, set by torchrun and Accelerate) less the loader workers, at least 1; OMP_NUM_THREADS wins,
whether the user set it or a launcher did (torchrun and `accelerate launch` put 1 into their processes when the
user set none, which is this rule's answer on a node of several processes too). The start-up banner says which
and why.
"""
from __future__ import annotations

import os
from typing import Optional

ENV = "OMP_NUM_THREADS"

_chosen: Optional[str] = None  # what `set_threads` chose and why, for the banner


def choose_threads(cores: int, processes: int, workers: int, user_setting: Optional[str] = None) -> tuple[int, str]:
    """(threads, why): the user's OMP_NUM_THREADS if valid, else this process's share of `cores` among
    `processes` less its `workers`, at least 1."""
    if user_setting and user_setting.strip().isdigit() and int(user_setting) > 0:
        return int(user_setting), f"{ENV}={int(user_setting)}"
    share = cores // max(1, processes)
    threads = max(1, share - workers)
    why = (f"{cores} core{'s' if cores != 1 else ''} / {processes} process{'es' if processes != 1 else ''} on this "
           f"node - {workers} loader worker{'s' if workers != 1 else ''}, at least 1; {ENV} overrides")
    return threads, why


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(workers: int, processes: Optional[int] = None) -> str:
    """Sets torch's intra-op threads for this process (see the module's doc; `processes`: those sharing this
    machine's cores, if not the launch's own); what was chosen and why."""
    import torch

    global _chosen
    processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    cores = usable_cores()
    threads, why = choose_threads(cores, processes, workers, os.environ.get(ENV))
    torch.set_num_threads(threads)
    _chosen = f"{threads} ({why})"
    return _chosen


def describe_threads() -> str:
    """The banner's line: the choice of `set_threads`, or torch's own count where none was made."""
    if _chosen is not None:
        return _chosen
    import torch

    return f"{torch.get_num_threads()} (torch's default)"
