"""Sharding work across processes started by torchrun / accelerate launch (gloo on CPU, nccl on CUDA)."""
from __future__ import annotations

import contextlib
import os

import torch.distributed as dist

from ditkit.formats.errors import ConfigError, HardwareError


def world() -> tuple[int, int]:
    """(rank, world_size) from the launcher's environment; (0, 1) when run alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank_device(device: str, env=os.environ, device_count: int | None = None) -> str:
    """The device this process runs on: under a launcher (WORLD_SIZE > 1) `--device cuda` is cuda:LOCAL_RANK, one
    GPU per process on each node (NCCL refuses two ranks on one device); alone, the device as given. A pinned
    `cuda:N` under a launcher would put every rank on GPU N, so it is refused; so is a LOCAL_RANK beyond the GPUs."""
    if not device.startswith("cuda") or int(env.get("WORLD_SIZE", 1)) == 1:
        return device
    local = int(env.get("LOCAL_RANK", env.get("RANK", 0)))
    if device != "cuda":
        raise ConfigError(f"--device {device} under a launcher puts every process on one GPU; pass --device cuda "
                          "(each process takes cuda:LOCAL_RANK)")
    if device_count is not None and local >= device_count:
        raise HardwareError(f"LOCAL_RANK {local} has no GPU: this node has {device_count}; start at most "
                            f"{device_count} processes per node")
    return f"cuda:{local}"


def use_rank_device(device: str) -> str:
    """rank_device(device), made the current CUDA device of this process (torch.cuda.set_device), so that every
    tensor placed on "cuda" (the loaded weights, the ops' own) lands on this rank's GPU."""
    import torch

    if not device.startswith("cuda") or world()[1] == 1:
        return device
    mine = rank_device(device, device_count=torch.cuda.device_count())
    torch.cuda.set_device(torch.device(mine))
    return mine


@contextlib.contextmanager
def process_group(device: str):
    """Join the launcher's process group for the duration of a command, and always tear it down."""
    rank, size = world()
    if size == 1 or dist.is_initialized():
        yield rank, size
        return
    if device.startswith("cuda"):
        use_rank_device(device)  # before NCCL starts: each rank on its own GPU
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
