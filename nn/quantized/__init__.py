"""The quantized module kinds: how each is made from a float module, written as plain tensors, and rebuilt.

KINDS is the registry formats reads and writes by (ditkit.formats.quantized) and ops quantizes with
(ditkit.ops.quantize: its schemes map nn.Linear to one of these kinds). The Kind contract is in base.py.
"""
from __future__ import annotations

from . import bnb, fp8, torch_dynamic, weight_only
from .base import FALLBACK_ATTR, KERNEL_ATTR, KIND_ATTR, SPEC_ATTR, Kind, int8_rows, is_quantized_module, tag

KINDS: dict[str, Kind] = {k.name: k for k in (
    torch_dynamic.KIND_INT8_DYNAMIC, weight_only.KIND_INT8_WEIGHT, weight_only.KIND_INT8_EMBEDDING,
    bnb.KIND_BNB_INT8, bnb.KIND_BNB_4BIT, fp8.KIND_FP8)}

__all__ = ["FALLBACK_ATTR", "KERNEL_ATTR", "KINDS", "KIND_ATTR", "SPEC_ATTR", "Kind", "bnb", "fp8", "int8_rows",
           "is_quantized_module", "tag", "torch_dynamic", "weight_only"]
