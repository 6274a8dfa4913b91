"""Rank, world, sharding and barriers: a thin layer over accelerate's PartialState.

The same code runs under `python`, `accelerate launch` and `torchrun` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import hashlib

import torch
from accelerate import PartialState


def state() -> PartialState:
    # Without a GPU, accelerate only sees torchrun's ranks when told it runs on the CPU.
    return PartialState(cpu=not torch.cuda.is_available())


def rank() -> int:
    return state().process_index


def world() -> int:
    return state().num_processes


def is_main() -> bool:
    return state().is_main_process


def barrier() -> None:
    if world() > 1:
        state().wait_for_everyone()


def all_sum(values: list[float]) -> list[float]:
    """Sums over ranks, on the backend's device (NCCL takes only CUDA tensors, gloo CPU ones)."""
    if world() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=state().device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def derive_seed(seed: int, *parts: object) -> int:
    """Every unit of work seeds its own generator from (seed, round, phase, unit), so a resumed run
    (on any number of ranks) draws the same numbers as one never interrupted."""
    key = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1
