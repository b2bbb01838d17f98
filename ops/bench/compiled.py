"""bench --compile: each model's calls compiled (ops.compile) beside its eager calls, and the report's `compile` entry.

Every model that compiles gets a second set of calls (the same weights, with the compiled forwards installed for the
call) keyed `(name + SUFFIX, batch size)`; they are timed in the same interleaved rounds as the eager calls, so the
speedup from compiling and the variant-vs-base speedups with and without compiling are paired ratios of one run.
The compile time is the wall time of each compiled call's first run (warm-up: dynamo traces, inductor builds);
the eager calls had their first run before (FLOP counting), so it is not an eager warm-up.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..compile import BACKEND, Compiled, graph_count, plan, preflight, warm_up
from ..runtime import sync
from ..timing import median, paired_ratio

SUFFIX = " +compile"


@dataclass
class CompiledModel:
    name: str
    compiled: bool
    mode: str | None = None
    reason: str | None = None  # why it runs eager only (an ONNX bundle, a module dynamo rejects)
    note: str | None = None  # e.g. a full compile made regional for a step accelerator
    compile_seconds: float | None = None  # every first compiled call of this model (all warm-ups), wall seconds
    graphs: int = 0  # graphs built in its warm-ups (0: it reused graphs an earlier model of the same shapes built)
    graph_breaks: int = 0
    max_abs_diff: float | None = None  # compiled vs eager step output, headline batch
    latency_ms_per_step: float | None = None  # headline batch, compiled
    speedup_from_compile_per_step: float | None = None  # this model eager / compiled (paired, see speedup_basis)
    speedup_per_step: float | None = None  # base compiled / this compiled
    speedup_per_step_uncompiled: float | None = None  # base eager / this eager (the report's own figure)
    speedup_from_compile_per_image: float | None = None
    speedup_per_image: float | None = None
    speedup_per_image_uncompiled: float | None = None
    by_batch_size: list[dict] = field(default_factory=list)


class CompiledCalls:
    """Compile every subject that can be, warm its calls up, and build the compiled twins of its calls."""

    def __init__(self, subjects, mode: str, device: str, log: Callable[[str], None]):
        self.device, self.log = device, log
        log(f"compile: checking that torch.compile ({BACKEND}) builds kernels on {device}")
        self.preflight_seconds = round(preflight(device), 3)
        self.models: dict[str, CompiledModel] = {}
        self.compiled: dict[str, Compiled] = {}
        for s in subjects:
            c, why = plan(s.bundle, mode)
            self.models[s.name] = CompiledModel(s.name, c is not None, None if c is None else c.mode, why,
                                                None if c is None else c.note)
            if c is not None:
                self.compiled[s.name] = c
            else:
                log(f"compile: {s.name} runs eager: {why}")

    def twins(self, calls: dict) -> dict:
        """{(name + SUFFIX, b): the compiled call} for the calls of compiled models, each warmed up once (the first
        of a model's calls compiles; the later ones only build graphs for new shapes); a model whose warm-up fails
        runs eager from then on, with the reason."""
        out = {}
        for (name, b), fn in calls.items():
            c, m = self.compiled.get(name), self.models[name]
            if c is None:
                continue
            self.log(f"compile: warming up {name} at batch {b}")
            w = warm_up(c, fn, lambda: sync(self.device))
            m.graphs += w.graphs
            m.graph_breaks += w.graph_breaks
            m.compile_seconds = round((m.compile_seconds or 0.0) + w.seconds, 3)
            if w.error is not None:
                m.compiled, m.reason = False, f"torch.compile failed on this model ({w.error}); it ran eager"
                self.log(f"compile: {name} runs eager: {w.error}")
                del self.compiled[name]
                out = {k: v for k, v in out.items() if k[0] != name + SUFFIX}
                continue
            out[(name + SUFFIX, b)] = c.wrap(fn)
        return out

    def parity(self, steps: dict, b: int) -> None:
        """Max |compiled - eager| of each compiled model's step output at batch b."""
        for name, c in self.compiled.items():
            fn = steps.get((name, b))
            if fn is None:
                continue
            eager, comp = fn(), c.wrap(fn)()
            if isinstance(eager, torch.Tensor) and isinstance(comp, torch.Tensor):
                self.models[name].max_abs_diff = float((eager.float() - comp.float()).abs().max())

    def entry(self, subjects, batch_sizes, basis: dict, ms: dict, image_basis: dict, image_ms: dict,
              graphs_during_timing: int) -> dict:
        """The report's `compile` entry (see docs/bench.md)."""
        base = subjects[0].name
        rows_of = {}
        for s in subjects:
            m = self.models[s.name]
            rows = []
            for b in batch_sizes:
                k, kc, bk, bkc = (s.name, b), (s.name + SUFFIX, b), (base, b), (base + SUFFIX, b)
                row = {"batch_size": b,
                       "latency_ms_per_step": _med(ms.get(kc)), "latency_ms_per_step_uncompiled": _med(ms.get(k)),
                       "speedup_from_compile_per_step": _ratio(basis, k, kc),
                       "speedup_per_step": _ratio(basis, bkc, kc),
                       "speedup_per_step_uncompiled": _ratio(basis, bk, k)}
                if image_ms.get(k):
                    row.update(latency_ms_per_image=_med(image_ms.get(kc), b),
                               latency_ms_per_image_uncompiled=_med(image_ms.get(k), b),
                               speedup_from_compile_per_image=_ratio(image_basis, k, kc),
                               speedup_per_image=_ratio(image_basis, bkc, kc),
                               speedup_per_image_uncompiled=_ratio(image_basis, bk, k))
                rows.append(row)
            head = rows[0]
            m.by_batch_size = rows
            for key in ("latency_ms_per_step", "speedup_from_compile_per_step", "speedup_per_step",
                        "speedup_per_step_uncompiled", "speedup_from_compile_per_image", "speedup_per_image",
                        "speedup_per_image_uncompiled"):
                setattr(m, key, head.get(key))
            rows_of[s.name] = asdict(m)
        return {"backend": BACKEND, "dynamic": False, "preflight_seconds": self.preflight_seconds,
                "graphs_during_timing": graphs_during_timing,
                "compile_seconds": "wall seconds of each compiled call's first run (trace + inductor build + one run)",
                "models": [rows_of[s.name] for s in subjects]}


def _med(xs, per: int = 1) -> float | None:
    return None if not xs else round(median(xs) / per, 4)


def _ratio(d: dict, a, b) -> float | None:
    return round(paired_ratio(d[a], d[b]), 4) if d.get(a) and d.get(b) else None


__all__ = ["CompiledCalls", "CompiledModel", "SUFFIX", "graph_count"]
