"""One FLOP counter for info, bench, prune and cache: torch's FlopCounterMode, attention included on every device.

torch's counter knows the CUDA attention kernels but not the CPU flash kernel that SDPA dispatches to on CPU, so
without EXTRA_FLOP_FORMULAS a CPU count leaves attention out. Quantized GEMMs that torch cannot see into are
taught to the same registry by their kinds (ops.quantize: torch_dynamic, bnb).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def call_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (0 where torch sees none: an onnxruntime session)."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


@torch.no_grad()
def count_flops(bundle, batch: int, hw: tuple[int, int]) -> int:
    """FLOPs of one transformer call on `batch` rows of the family's dummy inputs at latent size `hw`."""
    fam, tr = bundle.family, bundle.transformer
    latents, t, cond = fam.dummy_inputs(tr, batch, hw)
    return call_flops(lambda: fam.predict(tr, latents, t, cond))
