"""Per-step latency of a base and a pruned transformer, measured in the same run (interleaved, medians).

The basis follows `ditkit bench`: on CPU with one torch thread, the process CPU time of each call (the wall time
on an idle core, which other jobs on a shared machine do not inflate); wall time otherwise.
"""
from __future__ import annotations

import statistics

import torch

from ditkit.ops.metrics import Timer


def basis(device: str) -> str:
    return "cpu-time" if device == "cpu" and torch.get_num_threads() == 1 else "wall-clock"


@torch.no_grad()
def interleaved_ms(family, models: dict, inputs, device: str, warmup: int = 1, repeats: int = 5) -> dict:
    """Milliseconds of one transformer call per model; calls alternate A B, B A, ... so that load changes on a
    shared machine hit every model alike. Returns name -> {median_ms, samples_ms, cpu_samples_ms (CPU)}."""
    latents, t, cond = inputs
    names = list(models)
    timer = Timer(device)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(warmup + repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            ms = timer(lambda: family.predict(models[n], latents, t, cond))
            if r >= warmup:
                wall[n].append(round(ms, 3))
                if timer.cpu_ms is not None:
                    cpu[n].append(round(timer.cpu_ms, 3))
    out = {}
    for n in names:
        out[n] = {"median_ms": round(statistics.median(wall[n]), 3), "samples_ms": wall[n]}
        if cpu[n]:
            out[n]["cpu_samples_ms"] = cpu[n]
    return out


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a / b, each pair timed side by side in one round (cancels slow drifts)."""
    return statistics.median(x / max(y, 1e-9) for x, y in zip(a, b))
