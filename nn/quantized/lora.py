"""The LoRA layer around a ditkit quantized Linear (QLoRA): y = Wq(x) + scale * B(A(x)), the adapter in float.

peft wraps nn.Linear and bitsandbytes' Linear8bitLt / Linear4bit with its own layers. ditkit's own quantized
Linears (int8 weight-only, int8-dynamic: torch.ao on CPU and torch._int_mm on CUDA, fp8) are none of those:
`custom_modules()` maps them to QuantizedLoraLinear for peft's `LoraConfig._register_custom_module`, so peft
injects, loads, scales, activates and unloads the adapter as it does on a float Linear (ops/lora/adapters.py).
The quantized module stays the base layer, untouched; the adapter is never merged into it (that would
dequantize, add and requantize, with an error of its own): fusing belongs on the float model, before
quantizing (`ditkit quantize --lora`).
"""
from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from ditkit.nn.errors import ConfigError

from . import fp8, torch_dynamic, weight_only


class QuantizedLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear over a quantized base layer: its forward is base_layer(x) + the adapters (peft's own)."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        """(device, None): the adapter stays fp32 whatever the base's integer or fp8 storage."""
        t = next(iter(base_layer.buffers()), None)
        return (t.device if t is not None else torch.device("cpu")), None

    def merge(self, *args, **kwargs) -> None:
        raise ConfigError("a LoRA adapter is not merged into a quantized weight (dequantize, add, requantize); "
                           "fuse it into the float model and quantize that: ditkit quantize SRC --lora ADAPTER")

    def unmerge(self) -> None:  # never merged
        return None


def custom_modules() -> dict[type, type]:
    """{ditkit quantized Linear class: QuantizedLoraLinear} for LoraConfig._register_custom_module."""
    return {cls: QuantizedLoraLinear for cls in (weight_only.Int8WeightOnlyLinear, torch_dynamic.Int8MMLinear,
                                                  torch_dynamic.ao_linear_class(), fp8.Fp8Linear)}
