"""Measuring quantized models: bytes held by the weights (quantized kinds counted by their tensors), SQNR.

The kinds themselves (the Kind contract, int8 rows, the modules) are ditkit.nn.quantized.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ditkit.nn.quantized.base import KIND_ATTR, Kind


# -- measuring -------------------------------------------------------------------------------------

def own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's own parameters and persistent buffers (not its children's)."""
    out = [p for p in module._parameters.values() if p is not None]
    skip = getattr(module, "_non_persistent_buffers_set", set())
    out += [b for n, b in module._buffers.items() if b is not None and n not in skip]
    return out


def memory_bytes(model: nn.Module, kinds: dict[str, Kind]) -> int:
    """Bytes held by the weights: parameters, persistent buffers, and each quantized module's tensors.

    torch.ao keeps its int8 weights in an fbgemm packed object rather than tensors; it is counted by the
    int8 weight + scales it packs (the packed copy adds column offsets, under 1%).
    """
    total = 0

    def walk(m: nn.Module):
        nonlocal total
        kind = getattr(m, KIND_ATTR, None)
        if kind is not None:
            k = kinds[kind]
            total += k.nbytes(m) if k.nbytes else sum(t.numel() * t.element_size() for t in k.tensors(m).values())
            return
        total += sum(t.numel() * t.element_size() for t in own_tensors(m))
        for child in m.children():
            walk(child)

    walk(model)
    return total


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(sum x^2 / sum (x - y)^2); inf when identical (reported as null in JSON)."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class Energy:
    signal: float = 0.0
    noise: float = 0.0
    extra: dict = field(default_factory=dict)

    def add(self, ref: torch.Tensor, out: torch.Tensor) -> None:
        ref, out = ref.detach().double(), out.detach().double()
        self.signal += float(ref.pow(2).sum())
        self.noise += float((out - ref).pow(2).sum())

    @property
    def db(self) -> float:
        return sqnr_db(self.signal, self.noise)
