"""Per-step latency of a base and a pruned transformer, measured in the same run (ops.timing: interleaved, medians).

The basis follows `ditkit bench`: on CPU with one torch thread, the process CPU time of each call (the wall time
on an idle core, which other jobs on a shared machine do not inflate); wall time otherwise.
"""
from __future__ import annotations

import statistics

import torch

from ditkit.ops.timing import Timer, interleaved


@torch.no_grad()
def interleaved_ms(family, models: dict, inputs, device: str, warmup: int = 1, repeats: int = 5) -> dict:
    """Milliseconds of one transformer call per model; calls alternate A B, B A, ... so that load changes on a
    shared machine hit every model alike. Returns name -> {median_ms, samples_ms, cpu_samples_ms (CPU)}."""
    latents, t, cond = inputs
    calls = {n: (lambda m=m: family.predict(m, latents, t, cond)) for n, m in models.items()}
    wall, cpu = interleaved(calls, repeats, warmup, timer=Timer(device))
    out = {}
    for n in models:
        samples = [round(ms, 3) for ms in wall[n]]
        out[n] = {"median_ms": round(statistics.median(samples), 3), "samples_ms": samples}
        if n in cpu:
            out[n]["cpu_samples_ms"] = [round(ms, 3) for ms in cpu[n]]
    return out
