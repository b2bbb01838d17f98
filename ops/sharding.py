"""--sharding: how the training loop (ops/training.py) spreads what trains over the processes of a launcher.

  ddp   every process holds the whole model, its gradients, its AdamW state and its EMA; gradients are averaged
        after backward (accelerate's DistributedDataParallel). The default, and what one process runs.
  fsdp  PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) on torch.distributed (gloo on CPU, nccl on CUDA):
        each transformer block, then the root, is sharded on dim 0 across the processes, so parameters, gradients,
        AdamW state and the EMA are 1/N per process; a block is all-gathered for its forward and again for its
        backward and freed after, and gradients are reduce-scattered. On CUDA `--mixed-precision bf16` is FSDP's
        MixedPrecisionPolicy (bf16 compute copies of the fp32 shards, fp32 gradient reduction); on CPU fp32.

Under fsdp the loop trains a sharded copy (`FsdpEngine.model`) of the module it was given, whose own parameters are
emptied while it trains (their storage freed; dtype, device and the module's attributes stay), and filled again with
the gathered full weights (the EMA ones when there is an EMA) for validation and at the end, so the caller's module
object, its bundle and its hooks stay what they were. Checkpoints are gathered to full tensors on rank 0 (the
optimizer through torch.distributed.checkpoint.state_dict with full_state_dict and cpu_offload) and written in the
same format as a one-process run: either kind of run resumes the other's checkpoint. A resume loads the full
tensors on every process and shards them again.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ditkit.formats.errors import ConfigError

SHARDING = {
    "ddp": "every process holds the whole model and optimizer state; gradients averaged (accelerate DDP)",
    "fsdp": "parameters, gradients, optimizer state and EMA sharded across the processes (PyTorch FSDP2 "
            "fully_shard, per transformer block)",
}


def check_choice(sharding: str, mixed_precision: str) -> None:
    """What a config can check by itself (no environment)."""
    if sharding not in SHARDING:
        from ditkit.formats.errors import choice_error

        raise choice_error("sharding", sharding, SHARDING)
    if sharding == "fsdp" and mixed_precision == "fp16":
        raise ConfigError("--sharding fsdp trains in fp32 or bf16 (--mixed-precision bf16 on CUDA); fp16 needs a "
                          "loss scaler FSDP does not run: use --mixed-precision bf16 or --sharding ddp")


def check_run(sharding: str, mixed_precision: str, device: str, world: int) -> None:
    """Before anything is loaded or written: fsdp needs a launcher with 2 or more processes, and bf16 needs CUDA."""
    check_choice(sharding, mixed_precision)
    if sharding != "fsdp":
        return
    if world < 2:
        raise ConfigError("--sharding fsdp shards across processes: start it with torchrun --nproc_per_node N "
                          "(N >= 2); one process trains unsharded with --sharding ddp")
    if mixed_precision != "no" and not str(device).startswith("cuda"):
        raise ConfigError(f"--sharding fsdp --mixed-precision {mixed_precision} is for CUDA; on {device} FSDP "
                          "trains in fp32: drop --mixed-precision")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks when no family says otherwise: the members of its outermost nn.ModuleLists that
    hold parameters (diffusers' transformer_blocks, single_transformer_blocks ...), each one FSDP unit."""
    out: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                out.extend(b for b in child if next(b.parameters(), None) is not None)
            else:
                walk(child)

    walk(model)
    return out


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds of `t` (its shard when `t` is a DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """This process's bytes of parameters and optimizer state (local shards under fsdp)."""
    params = sum(local_bytes(p) for p in model.parameters())
    optim = sum(local_bytes(v) for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"param_bytes": params, "optimizer_bytes": optim, "state_bytes": params + optim}


def to_indexed(osd: dict, names: list[str]) -> dict:
    """An optimizer state dict keyed by parameter names (torch.distributed.checkpoint) -> keyed by position, as
    torch.optim.Optimizer.state_dict() keys it (the checkpoint's format)."""
    idx = {n: i for i, n in enumerate(names)}
    return {"state": {idx[k]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [idx[k] for k in g["params"]]} for g in osd["param_groups"]]}


def to_named(sd: dict, names: list[str]) -> dict:
    """The inverse of to_indexed."""
    return {"state": {names[int(i)]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]]}


class FsdpEngine:
    """A sharded copy of `module` and what the loop does with it (see the module docstring)."""

    def __init__(self, module: nn.Module, mixed_precision: str, units=None):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            raise ConfigError("--sharding fsdp needs a launcher's process group: start it with torchrun")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.module = module
        device = next(module.parameters()).device
        mesh = init_device_mesh(device.type, (self.world,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" and device.type == "cuda" else MixedPrecisionPolicy())
        # 1. the copy that trains: the module's structure, hooks (recover's feature capture) and buffers, sharing
        #    its parameters until fully_shard puts shards in their place; the module's own storage is freed then
        model = copy.deepcopy(module, memo={id(p): p for p in module.parameters()})
        # 2. bottom-up: every block its own unit (all-gathered, then freed, one at a time), then the root;
        #    units(model): the family's list (Family.shard_units), innermost first
        for b in (units or blocks)(model):
            if next(b.parameters(), None) is not None:
                fully_shard(b, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        self.release()
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def release(self) -> None:
        """Free the module's parameters (kept: dtype, device, requires_grad; the sharded copy holds the weights)."""
        for p in self.module.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def fill(self, ema: dict | None) -> None:
        """The module's parameters := the gathered full weights (the EMA's where there is one). Collective."""
        src = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, p in self.module.named_parameters():
                s = ema[n] if ema is not None and n in ema else src[n]
                p.data = s.detach().full_tensor().to(p.dtype)

    def full(self, tensors: dict) -> dict | None:
        """name -> DTensor gathered to a full CPU tensor on rank 0 (None elsewhere). Collective."""
        out = {}
        for n, t in tensors.items():
            full = t.detach().full_tensor()
            if self.rank == 0:
                out[n] = full.cpu()
        return out if self.rank == 0 else None

    def optimizer_state(self, opt) -> dict | None:
        """The full optimizer state on rank 0, keyed by position like a one-process run's (None elsewhere)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.model, opt,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return to_indexed(osd, [n for n, _ in self.named]) if self.rank == 0 else None

    def load_optimizer(self, opt, sd: dict) -> None:
        """Shard a full, position-keyed optimizer state (every process passes the same) into `opt`."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, opt, to_named(sd, [n for n, _ in self.named]),
                                 options=StateDictOptions(full_state_dict=True))

    def shard_like(self, full: dict) -> dict:
        """Full tensors (the same on every process) -> DTensors laid out like the trained parameters."""
        from torch.distributed.tensor import distribute_tensor

        return {n: distribute_tensor(full[n].to(p.device, torch.float32), p.device_mesh, p.placements,
                                     src_data_rank=None) for n, p in self.named}
