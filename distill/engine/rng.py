"""Every random number generator a run touches: seeded, captured and restored together.

All processes start from one seed, so that models are built alike; then each process moves to a stream of its
own (`seed_process`), or dropout masks, mixup weights and partners would repeat on every process. Captured
states are plain lists and tensors, so checkpoints load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import hashlib
import random
import struct

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (nearby inputs give unrelated seeds)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *(int(p) for p in parts)), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_process(seed: int, rank: int) -> None:
    """A random stream of this process's own, derived from the run's seed and the process index."""
    seed_everything(mix_seed(seed, rank, 0x5EED))


def capture_rng() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
