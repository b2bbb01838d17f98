"""Sharding work across processes started by torchrun / accelerate launch (gloo on CPU, nccl on CUDA)."""
from __future__ import annotations

import contextlib
import os

import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) from the launcher's environment; (0, 1) when run alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@contextlib.contextmanager
def process_group(device: str):
    """Join the launcher's process group for the duration of a command, and always tear it down."""
    rank, size = world()
    if size == 1 or dist.is_initialized():
        yield rank, size
        return
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield rank, size
    finally:
        dist.barrier()
        dist.destroy_process_group()


def shard(indices: list[int], rank: int, size: int) -> list[int]:
    return indices[rank::size]


def gather(obj, rank: int, size: int) -> list | None:
    """Every rank's object, on rank 0 (None elsewhere)."""
    if size == 1:
        return [obj]
    out = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
