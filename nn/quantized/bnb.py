"""bitsandbytes: LLM.int8() Linear8bitLt, and 4-bit (nf4 / fp4, blocks of 64) Linear4bit.

bitsandbytes 0.50 runs both on CPU. Written as plain tensors: Linear8bitLt as its int8 weight (CB)
and row scales (SCB); Linear4bit as the packed uint8 weight plus bitsandbytes' own serialized
quant state (`QuantState.as_dict(packed=True)`), rebuilt with `Params4bit.from_prequantized`.
"""
from __future__ import annotations

import logging
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.nn.dtypes import DTYPES

from .base import Kind, float_bias, linear_spec, tag

INT8 = "bnb-int8-linear"
LINEAR4 = "bnb-4bit-linear"
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, as in diffusers' BitsAndBytesConfig default


def _bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # per-layer "slow inference" notices
    _register_flops()
    return bitsandbytes


def _register_flops() -> None:
    """Teach torch's FlopCounterMode (info, bench) bitsandbytes' GEMMs: custom ops it cannot see into."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    ops = torch.ops.bitsandbytes
    formulas = {  # raw args -> 2 M K N, with A (..., K) and N from the weight
        "gemm_4bit": lambda A, B, shapeB, *a, out_val=None, **k: 2 * A.numel() * shapeB[0],
        "int8_mixed_scaled_mm": lambda A, CA, CB, *a, out_val=None, **k: 2 * A.numel() * CB.shape[0],
        "int8_scaled_mm": lambda A, B, *a, out_val=None, **k: 2 * A.numel() * B.shape[0],
    }
    for name, f in formulas.items():
        op = getattr(ops, name, None)
        if op is not None and op not in flop_registry:
            register_flop_formula(op, get_raw=True)(f)


def _on_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def _dense4(device: str) -> bool:
    """CPU: every call dequantizes the whole weight and multiplies in float (on every CPU: ditkit keeps the
    portable layout, so bitsandbytes' fused AVX512-BF16 kernel, which needs its repacked layout, never runs)."""
    return not _on_cuda(device)


def _dense8(device: str) -> bool:
    """CPU without AVX-512: the int8 values are multiplied by an fp32 matmul."""
    return not _on_cuda(device) and torch.backends.cpu.get_cpu_capability() != "AVX512"


def _kernel4(device: str, compute: str | None) -> str:
    if _on_cuda(device):
        return "bitsandbytes 4-bit CUDA: gemv_4bit for single rows, else dequantize_4bit + cuBLAS matmul"
    return f"bitsandbytes 4-bit CPU: dequantize_4bit (C++ kernel) + F.linear in {compute or 'the input dtype'}"


def _kernel8(device: str) -> str:
    if _on_cuda(device):
        return f"bitsandbytes LLM.int8() CUDA: int8 GEMM, fp16 outlier columns above {INT8_THRESHOLD}"
    mm = "fp32 matmul of the int8 values (no AVX-512 here)" if _dense8(device) else "torch._int_mm"
    return f"bitsandbytes LLM.int8() CPU: activations cast to fp16 and quantized per row, {mm}, " \
           f"fp16 outlier columns above {INT8_THRESHOLD}"


# -- LLM.int8() ------------------------------------------------------------------------------------

def _int8(cb: torch.Tensor, scb: torch.Tensor | None, bias, device: str, spec: dict, weight=None) -> nn.Module:
    bnb = _bnb()
    m = bnb.nn.Linear8bitLt(spec["in_features"], spec["out_features"], bias=spec["bias"], has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
    if weight is not None:  # quantize a float weight: Int8Params quantizes on .to(device)
        m.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        m.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
        m.weight.CB, m.weight.SCB = m.weight.data, scb
    m.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    m = m.to(device)
    return tag(m, INT8, _kernel8(device), spec, fallback=_dense8(device))


def make_int8(lin: nn.Linear, device: str, opts: dict) -> nn.Module:
    w = lin.weight.detach().float().clone()
    return _int8(None, None, float_bias(lin), device, linear_spec(lin), weight=w)


def int8_tensors(m) -> dict[str, torch.Tensor]:
    scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB  # the first call moves it to m.state
    out = {"weight": m.weight.data, "weight_scb": scb}
    if m.bias is not None:
        out["bias"] = m.bias
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def rebuild_int8(spec: dict, t: dict, device: str) -> nn.Module:
    return _int8(t["weight"], t["weight_scb"], t.get("bias"), device, dict(spec))


# -- 4-bit -----------------------------------------------------------------------------------------

STATE = "qs."  # prefix of the quant-state tensors among a module's tensors


def _state_tensors(param) -> dict[str, torch.Tensor]:
    out = {"weight": param.data}
    out.update({STATE + k: v for k, v in param.quant_state.as_dict(packed=True).items()})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _prequantized(bnb, t: dict, device: str, module):
    stats = {k[len(STATE):]: v.to(device) for k, v in t.items() if k.startswith(STATE)}
    return bnb.nn.Params4bit.from_prequantized(data=t["weight"].to(device), quantized_stats=stats,
                                                requires_grad=False, device=device, module=module)


def dequantize_flat(param, dtype: torch.dtype) -> torch.Tensor:
    """A 4-bit parameter's (N, K) weight in `dtype`, each scale applied to the block it belongs to.

    bitsandbytes' portable layout quantizes the flattened weight in blocks of `blocksize` consecutive values,
    so a block spans two rows wherever K is not a multiple of the block size (tiny-digits: K = 96, blocks of
    64). bitsandbytes 0.50's AVX512 dequantize_4bit kernel (any AVX512F CPU, K a multiple of 16) reads the
    scale of element (r, c) at absmax[r * (K // blocksize) + c // blocksize], which is that block's only
    when K is a multiple of the block size: elsewhere rows got their neighbours' scales (tiny-digits nf4:
    17.0 dB output SQNR instead of 29.3). Dequantized as rows of one block each (or as one row), the row
    index is the block index on every kernel; the values are those of bitsandbytes' own gemm_4bit path.
    """
    ops, qs = torch.ops.bitsandbytes, param.quant_state
    absmax = qs.absmax
    if qs.nested:  # double-quantized absmax: 8-bit codes, fp32 scales per state2 block, and an offset
        absmax = ops.dequantize_blockwise.default(absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize,
                                                  torch.float32) + qs.offset
    n, block = qs.shape.numel(), qs.blocksize
    rows = [n // block, block] if n % block == 0 else [1, n]
    return ops.dequantize_4bit.default(param.data, absmax, block, qs.quant_type, rows, dtype).reshape(qs.shape)


def _forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit.forward on CPU, its weight dequantized by dequantize_flat (bound to each CPU Linear4bit)."""
    if x.device.type != "cpu":
        return type(self).forward(self, x)
    dtype = self.compute_dtype or x.dtype  # as Linear4bit: --compute-dtype, else the input's
    bias = None if self.bias is None else self.bias.to(dtype)
    return F.linear(x.to(dtype), dequantize_flat(self.weight, dtype), bias).to(x.dtype)


def _linear4(spec: dict, device: str, weight=None, t=None, bias=None) -> nn.Module:
    bnb = _bnb()
    cd = spec.get("compute_dtype")
    m = bnb.nn.Linear4bit(spec["in_features"], spec["out_features"], bias=spec["bias"],
                          compute_dtype=DTYPES[cd] if cd else None, quant_type=spec["quant_type"],
                          compress_statistics=True, device="meta")
    if weight is not None:  # Params4bit quantizes on .to(device)
        m.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=spec["quant_type"],
                                     compress_statistics=True, module=m)
    else:
        m.weight = _prequantized(bnb, t, device, m)
    m.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight in place on its first forward
    # into a CPU-only layout: that fails for layers narrower than a quantization block ("shape '[192, 0]' is
    # invalid"), and the repacked tensors are not the format ditkit writes. Keep the portable layout.
    m.support_avx512bf16_for_cpu = False
    m = m.to(device)
    if not _on_cuda(device):
        m.forward = types.MethodType(_forward_cpu, m)
    return tag(m, LINEAR4, _kernel4(device, cd), spec, fallback=_dense4(device))


def make_linear4(lin: nn.Linear, device: str, opts: dict) -> nn.Module:
    spec = linear_spec(lin, quant_type=opts["quant_type"], compute_dtype=opts.get("compute_dtype"))
    return _linear4(spec, device, weight=lin.weight.detach().float().clone(), bias=float_bias(lin))


def linear4_tensors(m) -> dict[str, torch.Tensor]:
    out = _state_tensors(m.weight)
    if m.bias is not None:
        out["bias"] = m.bias.detach().cpu().float().contiguous()
    return out


def rebuild_linear4(spec: dict, t: dict, device: str) -> nn.Module:
    return _linear4(dict(spec), device, t=t, bias=t.get("bias"))


def dequantize_int8(m) -> torch.Tensor:
    """LLM.int8()'s weight as its matmul sees it: int8 rows x SCB / 127 (the outlier columns are activations')."""
    scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
    return m.weight.data.float() * (scb.float() / 127.0)[:, None]


def dequantize_linear4(m) -> torch.Tensor:
    if m.weight.device.type == "cpu":
        return dequantize_flat(m.weight, torch.float32)
    return _bnb().functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()


KIND_BNB_INT8 = Kind(INT8, nn.Linear, make_int8, int8_tensors, rebuild_int8,
                     "bitsandbytes LLM.int8(): int8 weights (per row), int8 activations with fp16 outliers",
                     dequantize=dequantize_int8)
KIND_BNB_4BIT = Kind(LINEAR4, nn.Linear, make_linear4, linear4_tensors, rebuild_linear4,
                     "bitsandbytes 4-bit weights (nf4/fp4, blocks of 64, double-quantized absmax)",
                     dequantize=dequantize_linear4)
