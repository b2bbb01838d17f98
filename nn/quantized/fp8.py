"""fp8: float8 e4m3 weights and activations through PyTorch's torch._scaled_mm (no torchao needed).

The fp8 GEMM needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell); the scheme is
refused elsewhere (ops.quantize checks before any work). Scales are per tensor: one for the weight,
one per call for the activations (dynamic), which every fp8-capable GPU's _scaled_mm accepts.
_scaled_mm needs K and N to be multiples of 16; other layers stay in full precision (reported).
On disk: weight float8_e4m3fn (N, K), weight_scale fp32 (), bias fp32 (N,).
"""
from __future__ import annotations

import torch
from torch import nn

from ditkit.nn.dtypes import DTYPES

from .base import Kind, float_bias, input_differentiable, linear_spec, tag

KIND = "fp8-linear"
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_CAPABILITY = (8, 9)
DEFAULT_COMPUTE = "bf16"  # _scaled_mm's usual output dtype on GPUs


class Fp8Linear(nn.Module):
    def __init__(self, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = w8.shape[1], w8.shape[0]
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", w8)  # (N, K) float8_e4m3fn
        self.register_buffer("weight_scale", scale)  # () fp32
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return input_differentiable(x, self._forward, self.dequantized)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale  # (N, K)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        a = (x2.abs().amax() / FP8_MAX).clamp(min=1e-12)  # () dynamic per-tensor activation scale
        x8 = (x2 / a).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        y = torch._scaled_mm(x8, self.weight.t(), scale_a=a, scale_b=self.weight_scale,
                             out_dtype=self.compute_dtype)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def fits(lin: nn.Linear) -> bool:
    """_scaled_mm's shape rule: K and N multiples of 16."""
    return lin.in_features % 16 == 0 and lin.out_features % 16 == 0


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.detach().float()
    scale = (w.abs().amax() / FP8_MAX).clamp(min=1e-12)  # ()
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _module(w8, scale, bias, device: str, spec: dict) -> nn.Module:
    cd = spec.get("compute_dtype") or DEFAULT_COMPUTE
    m = Fp8Linear(w8, scale, bias, DTYPES[cd]).to(device)
    return tag(m, KIND, f"torch._scaled_mm fp8 e4m3 x e4m3 -> {cd}, per-tensor scales (activation scale computed "
               "each call)", {**spec, "compute_dtype": cd})


def make(lin: nn.Linear, device: str, opts: dict) -> nn.Module:
    w8, scale = quantize_weight(lin.weight)
    return _module(w8, scale, float_bias(lin), device, linear_spec(lin, compute_dtype=opts.get("compute_dtype")))


def tensors(m: Fp8Linear) -> dict[str, torch.Tensor]:
    out = {"weight": m.weight, "weight_scale": m.weight_scale}
    if m.bias is not None:
        out["bias"] = m.bias
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def rebuild(spec: dict, t: dict, device: str) -> nn.Module:
    return _module(t["weight"], t["weight_scale"], t.get("bias"), device, dict(spec))


def check_device(device: str) -> str | None:
    """Why this device cannot run fp8, or None when it can."""
    if not str(device).startswith("cuda"):
        return (f"fp8 needs a CUDA GPU with compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                f"(Ada/Hopper: torch._scaled_mm); this run is on {device}. On CPU use int8-dynamic")
    if not torch.cuda.is_available():
        return "fp8 needs a CUDA GPU with compute capability >= 8.9; no CUDA device is available here"
    cc = torch.cuda.get_device_capability(torch.device(device))
    if cc < MIN_CAPABILITY:
        return (f"fp8 needs compute capability >= 8.9 (Ada/Hopper); {torch.cuda.get_device_name(torch.device(device))} "
                f"has {cc[0]}.{cc[1]}. Use int8-dynamic or bnb-nf4 on this GPU")
    return None


KIND_FP8 = Kind(KIND, nn.Linear, make, tensors, rebuild, "float8 e4m3 weights and activations, per-tensor scales",
                dequantize=lambda m: m.dequantized())
