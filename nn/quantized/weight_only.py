"""int8 weight-only: int8 weights with one fp32 scale per output row (or per table row); float activations.

Linear ("int8-weight-linear"): each call dequantizes the weight to the compute dtype and runs F.linear.
This saves memory and disk, not time: PyTorch's fused kernel (torch._weight_int8pack_mm) ran a
DiT-XL/2-sized MLP 43x slower than fp32 on this AVX2 CPU (docs/quantize.md), and torchao's
Int8WeightOnlyConfig measured 1.05x fp32 here, so neither is used.
Embedding ("int8-embedding"): a lookup table stored as int8 rows + a scale per row; a lookup
dequantizes only the rows it gathers (a lookup has no activations to quantize, and a row scale keeps
each class vector at its own scale).
Both also store the sensitive layers that DiT repeats inside every block (ops.quantize: --sensitive).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.nn.dtypes import DTYPES

from .base import Kind, float_bias, int8_rows, linear_spec, tag

LINEAR = "int8-weight-linear"
EMBEDDING = "int8-embedding"


class Int8WeightOnlyLinear(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype | None):
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.compute_dtype = compute_dtype  # None: the input's dtype
        self.register_buffer("weight", q)  # (N, K) int8
        self.register_buffer("weight_scale", scale)  # (N,) fp32
        self.register_buffer("bias", bias)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # differentiable w.r.t. x as it is (F.linear)
        dt = self.compute_dtype or x.dtype
        w = self.weight.to(dt) * self.weight_scale.to(dt)[:, None]  # (N, K)
        y = F.linear(x.to(dt), w, None if self.bias is None else self.bias.to(dt))
        return y.to(x.dtype)


class Int8Embedding(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.dtype = dtype
        self.register_buffer("weight", q)  # (rows, D) int8
        self.register_buffer("weight_scale", scale)  # (rows,) fp32

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx, self.weight).to(self.dtype)  # (..., D)
        return rows * self.weight_scale[idx].to(self.dtype)[..., None]


def _linear(q, scale, bias, compute_dtype: str | None, device: str, spec: dict) -> nn.Module:
    cd = DTYPES[compute_dtype] if compute_dtype else None
    m = Int8WeightOnlyLinear(q, scale, bias, cd).to(device)
    # a sensitive layer stored this way inside another scheme is not that scheme's speed path: no fallback flag
    return tag(m, LINEAR, f"int8 weight dequantized to {compute_dtype or 'the input dtype'} each call + F.linear "
               "(saves memory, not time)", {**spec, "compute_dtype": compute_dtype},
               fallback=spec.get("role") != "sensitive")


def make_linear(lin: nn.Linear, device: str, opts: dict) -> nn.Module:
    q, scale = int8_rows(lin.weight)
    spec = linear_spec(lin, **({"role": opts["role"]} if opts.get("role") else {}))
    return _linear(q, scale, float_bias(lin), opts.get("compute_dtype"), device, spec)


def linear_tensors(m: Int8WeightOnlyLinear) -> dict[str, torch.Tensor]:
    out = {"weight": m.weight, "weight_scale": m.weight_scale}
    if m.bias is not None:
        out["bias"] = m.bias
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def rebuild_linear(spec: dict, t: dict, device: str) -> nn.Module:
    return _linear(t["weight"], t["weight_scale"], t.get("bias"), spec.get("compute_dtype"), device, spec)


def _embedding(q, scale, device: str, spec: dict) -> nn.Module:
    m = Int8Embedding(q, scale).to(device)
    return tag(m, EMBEDDING, "int8 rows gathered, then scaled per row (dequantizes only the looked-up rows)", spec)


def make_embedding(emb: nn.Embedding, device: str, opts: dict) -> nn.Module:
    q, scale = int8_rows(emb.weight)
    return _embedding(q, scale, device, {"num_embeddings": emb.num_embeddings, "embedding_dim": emb.embedding_dim})


def embedding_tensors(m: Int8Embedding) -> dict[str, torch.Tensor]:
    return {"weight": m.weight.detach().cpu().contiguous(), "weight_scale": m.weight_scale.detach().cpu().contiguous()}


def rebuild_embedding(spec: dict, t: dict, device: str) -> nn.Module:
    return _embedding(t["weight"], t["weight_scale"], device, spec)


KIND_INT8_WEIGHT = Kind(LINEAR, nn.Linear, make_linear, linear_tensors, rebuild_linear,
                        "int8 weights (per output row), float activations", dequantize=lambda m: m.dequantized())
KIND_INT8_EMBEDDING = Kind(EMBEDDING, nn.Embedding, make_embedding, embedding_tensors, rebuild_embedding,
                           "int8 table rows with a scale per row")
