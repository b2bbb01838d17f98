"""One timer for every op that compares calls: interleaved rounds, wall and process CPU time, paired ratios.

Calls are timed in rounds that alternate their order (A B, then B A, ...) after warm-up rounds, so that the
drift of a shared machine hits every call alike; a ratio is the median over rounds of the two calls' ratio in
the same round. On CPU the timer also keeps the process CPU time of each call: with one torch thread that is
the wall time the call would take on an idle core, whatever else the machine runs (speedup_basis).
Users: bench (per-step and end-to-end latency), prune (base vs pruned step), the calibrating ops' cost
models (cache, distill --mode feedback) through cpu_ms.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Hashable

import numpy as np
import torch


class Timer:
    """Milliseconds of one call: CUDA events around it on GPU, perf_counter on CPU (both synchronized).

    On CPU it also keeps `cpu_ms`, the process CPU time of the last call (user + system, all threads):
    with one torch thread that is the wall time the call would take on an idle core, whatever else the
    machine is running.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.cpu_ms: float | None = None

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        t1, c1 = time.perf_counter(), time.process_time()
        self.cpu_ms = (c1 - c0) * 1e3
        return (t1 - t0) * 1e3


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def p90(xs: list[float]) -> float:
    """90th percentile, linear interpolation between closest ranks (numpy's default)."""
    return float(np.percentile(np.asarray(xs, dtype=np.float64), 90))


def speedup_basis(device: str) -> str:
    """What ratios compare: CPU time on CPU with one torch thread (immune to other jobs), else wall time (with
    more threads, CPU time would count parallel work, not latency)."""
    return "cpu-time" if device == "cpu" and torch.get_num_threads() == 1 else "wall-clock"


def interleaved(calls: dict[Hashable, Callable[[], object]], repeats: int, warmup: int = 1, *, timer: Timer,
                groups: list[list[Hashable]] | None = None, target_ms: float = 0.0,
                on_round: Callable[[int], None] | None = None,
                after_round: Callable[[], None] | None = None) -> tuple[dict, dict]:
    """({key: [wall ms of the call, one per timed round]}, the same in process CPU ms (CPU timer; else {})).

    Each of `warmup + repeats` rounds calls every key once; rounds alternate the order, reversing `groups` of
    keys as wholes (keys within a group keep their order; default: each key its own group). After the warm-up
    rounds, a call shorter than `target_ms` is repeated back to back within its round (the same count in every
    round) so that one sample is not a single sub-millisecond call. on_round(r) runs before round r,
    after_round() after each.
    """
    if not calls:
        return {}, {}
    groups = groups if groups is not None else [[k] for k in calls]
    wall = {k: [] for k in calls}
    cpu = {k: [] for k in calls}
    inner = {k: 1 for k in calls}
    for r in range(warmup + repeats):
        if r == warmup and warmup and target_ms:
            inner = {k: max(1, min(100, round(target_ms / max(median(wall[k]), 1e-3)))) for k in calls}
            wall, cpu = {k: [] for k in calls}, {k: [] for k in calls}
        if on_round is not None:
            on_round(r)
        for group in (groups if r % 2 == 0 else groups[::-1]):
            for k in group:
                fn, n = calls[k], inner[k]
                ms = timer(fn if n == 1 else lambda: [fn() for _ in range(n)]) / n
                wall[k].append(ms)
                if timer.cpu_ms is not None:
                    cpu[k].append(timer.cpu_ms / n)
        if after_round is not None:
            after_round()
    return {k: v[-repeats:] for k, v in wall.items()}, {k: v[-repeats:] for k, v in cpu.items() if v}


def cpu_ms(calls: dict, repeats: int) -> dict:
    """Median process CPU time (ms) of each call, on one thread, in interleaved rounds (one warm-up round): what
    other jobs on a shared machine do not inflate. The calibrating ops' cost models (cache, distill --mode
    feedback) are built from it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, cpu = interleaved(calls, repeats, warmup=1, timer=Timer("cpu"))
    finally:
        torch.set_num_threads(threads)
    return {k: median(v) for k, v in cpu.items()}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a / b, each pair timed side by side in one round (cancels slow drifts)."""
    return median([x / max(y, 1e-9) for x, y in zip(a, b)])
