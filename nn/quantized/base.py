"""What every quantized module kind shares: the Kind contract, the attributes it tags modules with, int8 rows.

A *kind* is one quantized module type as it sits on disk (e.g. "int8-linear": int8 weights + one fp32
scale per output row). It knows how to make itself from a float module, which plain tensors it is
written as, and how to rebuild itself from them on a given device. The on-disk form is the same
whichever kernel runs it: an "int8-linear" runs through torch.ao's fbgemm kernel on CPU and through
torch._int_mm on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

KIND_ATTR = "ditkit_kind"  # set on every quantized module: its on-disk kind
KERNEL_ATTR = "ditkit_kernel"  # set on every quantized module: the kernel path that runs it (bench reports it)
FALLBACK_ATTR = "kernel_fallback"  # True where the matmul runs in float on dequantized weights (bench: no real speedup)
SPEC_ATTR = "ditkit_spec"  # set on every quantized module: JSON-able options needed to rebuild it


@dataclass(frozen=True)
class Kind:
    name: str
    source: type  # the float module type it replaces (nn.Linear, nn.Embedding)
    make: Callable  # (float_module, device, opts: dict) -> quantized module
    tensors: Callable  # (quantized module) -> {suffix: tensor}, everything needed to rebuild it
    rebuild: Callable  # (spec: dict, tensors: dict, device) -> quantized module
    doc: str = ""
    nbytes: Callable | None = None  # (quantized module) -> bytes of its tensors, where tensors() would copy
    dequantize: Callable | None = None  # (quantized module) -> its float weight as the kernel sees it, fp32


def tag(module: nn.Module, kind: str, kernel: str, spec: dict, fallback: bool = False) -> nn.Module:
    setattr(module, KIND_ATTR, kind)
    setattr(module, KERNEL_ATTR, kernel)
    setattr(module, SPEC_ATTR, spec)
    setattr(module, FALLBACK_ATTR, fallback)
    return module


def is_quantized_module(module: nn.Module) -> bool:
    return getattr(module, KIND_ATTR, None) is not None


def linear_spec(lin: nn.Linear, **extra) -> dict:
    return {"in_features": lin.in_features, "out_features": lin.out_features, "bias": lin.bias is not None, **extra}


def float_bias(lin: nn.Linear) -> torch.Tensor | None:
    return None if lin.bias is None else lin.bias.detach().float().clone()


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: w (N, K) float -> (q int8 (N, K) in [-127, 127], scale fp32 (N,))."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class _DequantizedGrad(torch.autograd.Function):
    """y = the quantized kernel's output; dL/dx = dL/dy W with W the dequantized weight (QLoRA's backward).

    The weight is frozen (no gradient for it); the kernels whose forward autograd cannot see into (torch.ao's
    packed int8 GEMM, torch._int_mm, torch._scaled_mm: their inputs are cast to int8 / fp8 first) still pass
    the gradient on to the layers before them, so an adapter anywhere in a quantized model trains."""

    @staticmethod
    def forward(ctx, x, run, weight):
        ctx.weight, ctx.dtype = weight, x.dtype  # weight: () -> (N, K) float, called in backward only
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx, g):
        w = ctx.weight().to(g.device, g.dtype)  # (N, K)
        return (g @ w).to(ctx.dtype), None, None  # (..., N) @ (N, K) -> (..., K)


def input_differentiable(x: torch.Tensor, run: Callable, weight: Callable) -> torch.Tensor:
    """run(x), differentiable w.r.t. x through the dequantized weight where autograd needs it (training)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _DequantizedGrad.apply(x, run, weight)
    return run(x)
