"""Per-step latency of a base and a pruned transformer, measured in the same run (interleaved, medians)."""
from __future__ import annotations

import statistics
import time

import torch

from ditkit.ops.runtime import sync


@torch.no_grad()
def interleaved_ms(family, models: dict, inputs, device: str, warmup: int = 1, repeats: int = 5) -> dict:
    """Median milliseconds of one transformer call per model; calls alternate A B, B A, ... so that load
    changes on a shared machine hit every model alike. Returns name -> {median_ms, samples_ms}."""
    latents, t, cond = inputs
    names = list(models)
    samples = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            sync(device)
            t0 = time.perf_counter()
            family.predict(models[n], latents, t, cond)
            sync(device)
            if r >= warmup:
                samples[n].append((time.perf_counter() - t0) * 1e3)
    return {n: {"median_ms": round(statistics.median(s), 3), "samples_ms": [round(x, 3) for x in s]}
            for n, s in samples.items()}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a / b, each pair timed side by side in one round (cancels slow drifts)."""
    return statistics.median(x / y for x, y in zip(a, b))
