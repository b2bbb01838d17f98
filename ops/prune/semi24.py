"""2:4: semi-structured sparsity -- in every group of 4 consecutive input weights of a row, the 2 largest |w| stay.

The pruned model is saved densely (safetensors holds the zeros). Speed needs PyTorch's semi-structured sparse
kernels (`torch.sparse.to_sparse_semi_structured`: CUTLASS / cuSPARSELt), which run on CUDA devices of compute
capability >= 8.0 in fp16 / bf16; anywhere else the model runs dense and is reported as such.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .magnitude import prunable_linears

GROUP = 4
KEEP = 2
DENSE = "dense (2:4 sparse kernels need CUDA cc>=8.0)"


def mask_2_4(w: torch.Tensor) -> torch.Tensor:
    """Boolean mask (same shape as w (out, in)) keeping the 2 largest |w| of each 4 consecutive inputs."""
    groups = w.detach().abs().reshape(w.shape[0], -1, GROUP)  # (out, in/4, 4)
    top = groups.topk(KEEP, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(w.shape)


def is_2_4(w: torch.Tensor) -> bool:
    nz = (w.reshape(w.shape[0], -1, GROUP) != 0).sum(-1)
    return bool((nz <= KEEP).all())


def kernel_available(device: str, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the semi-structured kernels can serve this device/dtype, and why not."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False, DENSE
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if (major, minor) < (8, 0):
        return False, f"dense (2:4 sparse kernels need CUDA cc>=8.0; this GPU is {major}.{minor})"
    if dtype not in (torch.float16, torch.bfloat16):
        return False, "dense (2:4 sparse kernels need fp16/bf16 weights; rerun with --dtype bf16)"
    return True, "semi-structured sparse (torch.sparse.to_sparse_semi_structured)"


def to_semi_structured_(tr: nn.Module, names: list[str]) -> int:
    """Swap the named Linears' weights for semi-structured sparse tensors (CUDA cc>=8.0); returns how many."""
    from torch.sparse import to_sparse_semi_structured

    mods = dict(tr.named_modules())
    done = 0
    for n in names:
        m = mods[n]
        try:  # the kernels have minimum / multiple-of shapes; layers that do not fit stay dense
            m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.data), requires_grad=False)
            done += 1
        except (RuntimeError, ValueError):
            continue
    return done


def run(bundle, cfg, calib=None, say=None):
    fam = bundle.family
    pruned = copy.deepcopy(bundle.transformer)
    layers, protected = prunable_linears(fam, pruned)
    done, skipped = {}, []
    for name, m in layers.items():
        if m.in_features % GROUP:
            skipped.append(name)
            continue
        m.weight.data.mul_(mask_2_4(m.weight.data))
        done[name] = m
    n = sum(m.weight.numel() for m in done.values())
    zeros = sum(int((m.weight == 0).sum()) for m in done.values())
    plan = {
        "pattern": "2:4", "pruned_layers": sorted(done), "skipped_layers": skipped, "protected_layers": protected,
        "prunable_weights": n, "zeroed_weights": zeros, "sparsity_prunable": zeros / max(n, 1),
    }
    return pruned, plan
