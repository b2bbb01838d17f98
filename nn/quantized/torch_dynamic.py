"""int8 dynamic: int8 weights (one scale per output row) and int8 activations quantized on the fly.

CPU: torch.ao's dynamically quantized Linear. Measured here on a DiT-XL/2-sized
MLP (docs/quantize.md): 0.5x the fp32 time, while torch._int_mm took 24x and
torch._weight_int8pack_mm 43x on this AVX2 CPU (no VNNI / AVX-512), so torch.ao is the only int8
path worth running on CPU. The API is deprecated in favour of torchao but present in torch 2.13.
torch.ao packs each weight for one backend, and the packed weight picks the kernel. Measured per
layer shape (docs/quantize.md, one thread): oneDNN is 5-15% faster than fbgemm on large token-wise
layers (512 x 1152 -> 4608: 0.45-0.47x fp32 vs 0.50-0.54x), but has ~0.1 ms more overhead per call, so
it loses on small layers (3x fp32 on a 128-wide layer vs fbgemm's 2x) and on the adaLN modulation
GEMV (2 rows x 1152 -> 6912: 0.43x vs fbgemm's 0.13x). So: oneDNN for layers with >= 1M weights
that run on token rows, fbgemm for the rest; the choice is stored in the module's spec ("engine")
so a reload runs the same kernel.
CUDA: torch._int_mm (cuBLASLt int8 GEMM) with per-token activation scales; rows that the kernel
cannot take (M <= 16, K or N not multiples of 8) run the dequantized weight through F.linear.
On disk both are the same tensors: weight int8 (N, K), weight_scale fp32 (N,), bias fp32 (N,).
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .base import Kind, float_bias, input_differentiable, int8_rows, linear_spec, tag

KIND = "int8-dynamic-linear"


def _register_flops() -> None:
    """Teach torch's FlopCounterMode (info, bench) the int8 GEMMs, which it does not count by itself."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    def gemm(x, w, *args, out_val=None, **kwargs) -> int:  # (..., K) -> (..., N): 2 M K N
        return 2 * x.numel() * out_val.shape[-1]

    for op in (torch.ops.quantized.linear_dynamic, torch.ops.aten._int_mm):
        if op not in flop_registry:
            register_flop_formula(op, get_raw=True)(gemm)


_register_flops()


ONEDNN_MIN_WEIGHTS = 1 << 20  # oneDNN beats fbgemm from about this size on token rows (module docstring)


def cpu_engine(in_features: int, out_features: int, conditioning: bool) -> str:
    """The torch.ao backend to pack a layer for: onednn for large token-wise layers, else fbgemm/x86."""
    engines = torch.backends.quantized.supported_engines
    if "onednn" in engines and not conditioning and in_features * out_features >= ONEDNN_MIN_WEIGHTS:
        return "onednn"
    return next((e for e in ("fbgemm", "x86") if e in engines), torch.backends.quantized.engine)


@functools.cache
def ao_linear_class() -> type:
    """torch.ao's dynamic int8 Linear, differentiable w.r.t. its input (its own packed GEMM has no autograd
    formula: gradients stopped there, silently). Its name stays DynamicQuantizedLinear (torch.ao's _get_name)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    class Int8DynamicLinear(DynamicQuantizedLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return input_differentiable(x, super().forward, self.dequantized)

        def dequantized(self) -> torch.Tensor:
            return self._weight_bias()[0].dequantize()  # (N, K) fp32

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            """The on-disk tensors (weight int8, weight_scale, bias), not torch.ao's packed tuple and dtype."""
            for k, v in tensors(self).items():
                destination[prefix + k] = v

        @property
        def qweight(self) -> torch.Tensor:
            """The int8 weight (N, K), by the name peft looks for a quantized layer's device under (torch.ao's
            `weight` is a method)."""
            return self._weight_bias()[0].int_repr()

    return Int8DynamicLinear


def _ao_linear(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, spec: dict) -> nn.Module:
    n, k = q.shape
    engine = spec.get("engine") or torch.backends.quantized.engine  # files from before "engine": the default
    if engine not in torch.backends.quantized.supported_engines:
        engine = torch.backends.quantized.engine
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = engine  # set_weight_bias packs the weight for this backend
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices (quantized tensor creation)
            m = ao_linear_class()(k, n, bias_=bias is not None, dtype=torch.qint8)
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(n, dtype=torch.long), 0)
            m.set_weight_bias(qw, bias)
    finally:
        torch.backends.quantized.engine = previous
    label = {"onednn": "oneDNN", "x86": "x86/fbgemm"}.get(engine, engine)
    return tag(m, KIND, f"torch.ao dynamic int8 ({label}): per-channel int8 weights, per-tensor int8 "
               "activations quantized each call (7-bit range)", spec)


class Int8MMLinear(nn.Module):
    """int8 x int8 -> int32 through torch._int_mm, activations quantized per token each call (CUDA)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight", q)  # (N, K) int8
        self.register_buffer("weight_scale", scale)  # (N,) fp32
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return input_differentiable(x, self._forward, self.dequantized)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]  # (N, K)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        m = x2.shape[0]
        if m > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0:
            a = (x2.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)  # (M, 1) per-token scale
            xq = torch.round(x2 / a).clamp(-127, 127).to(torch.int8)
            y = torch._int_mm(xq, self.weight.t()).float() * a * self.weight_scale  # (M, N)
        else:  # shapes cuBLASLt's int8 GEMM refuses: dequantized weight, same numbers to within fp32 rounding
            y = F.linear(x2, self.dequantized())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def _module(q, scale, bias, device: str, spec: dict) -> nn.Module:
    if str(device).startswith("cuda"):
        m = Int8MMLinear(q, scale, bias).to(device)
        return tag(m, KIND, "torch._int_mm (cuBLASLt int8 GEMM): per-row int8 weights, per-token int8 activations "
                   "quantized each call; M <= 16 rows run the dequantized weight", spec)
    return _ao_linear(q, scale, bias, spec)


def make(lin: nn.Linear, device: str, opts: dict) -> nn.Module:
    """opts["conditioning"]: the layer runs on one row per sample (adaLN modulation), not on token rows."""
    q, scale = int8_rows(lin.weight)
    spec = linear_spec(lin)
    if not str(device).startswith("cuda"):
        spec["engine"] = cpu_engine(lin.in_features, lin.out_features, bool(opts.get("conditioning")))
    return _module(q, scale, float_bias(lin), device, spec)


def tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(m, Int8MMLinear):
        out = {"weight": m.weight, "weight_scale": m.weight_scale}
        bias = m.bias
    else:  # torch.ao: unpack the fbgemm weight
        qw, bias = m._weight_bias()
        out = {"weight": qw.int_repr(), "weight_scale": qw.q_per_channel_scales().float()}
    if bias is not None:
        out["bias"] = bias.detach().float()
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def nbytes(m: nn.Module) -> int:
    """int8 weight + fp32 row scales + fp32 bias, without unpacking torch.ao's packed weight (a copy)."""
    n, k = m.out_features, m.in_features
    return n * k + 4 * n + (4 * n if m.ditkit_spec.get("bias") else 0)


def rebuild(spec: dict, t: dict, device: str) -> nn.Module:
    return _module(t["weight"], t["weight_scale"].float(), t.get("bias"), device, dict(spec))


def dequantize(m: nn.Module) -> torch.Tensor:
    return m.dequantized()


KIND_INT8_DYNAMIC = Kind(KIND, nn.Linear, make, tensors, rebuild,
                         "int8 weights (per output row) x int8 activations (dynamic)", nbytes, dequantize)
