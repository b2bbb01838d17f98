"""torch.compile (inductor) for the PyTorch backend, as generate and bench apply it (`--compile`).

Two modes (COMPILE_MODES):
  regional  every block of the family's block stack(s) compiled on its own (torch's regional-compilation
            recipe, diffusers' `compile_repeated_blocks`). The blocks of a stack share one code object and, with
            parameters as graph inputs (dynamo's default since torch 2.5), one compiled graph: compile time is
            that of one block, whatever the depth. Each block's tensor inputs are made contiguous first (block 0
            gets a transposed view from the patch embedding, and the sampler an expanded timestep: without it,
            a graph per stride). What runs between blocks (embeddings, final norm, unpatchify) stays eager.
  full      the transformer's forward as one graph: every block is traced and compiled, so compile time grows
            with the depth; the step-caching policy and the feedback module, which replace blocks per step,
            cannot sit inside it (every step would recompile), so a bundle carrying one is compiled regionally.
`dynamic=False`: a graph per input shape and dtype (the batch of a run, its last smaller batch, the timestep's
dtype); the timestep is a tensor, so its value never recompiles. A compiled module keeps its weights: the
compiled forwards are installed on the modules while `Compiled.active()` is entered and removed after, so bench
times the same model compiled and not, interleaved.

A failure to build kernels at all (no C++ compiler for inductor on CPU, no Triton on CUDA) is the typed
CompileError (`preflight`); a model that cannot be compiled (an ONNX bundle, a module dynamo rejects) is
reported as not compiled, with the reason, and runs eager.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ditkit.formats.errors import CompileError, choice_error

COMPILE_MODES: dict[str, str] = {
    "regional": "each repeated transformer block compiled on its own; one graph serves every block of a stack",
    "full": "the transformer's whole forward as one graph (compile time grows with the depth)",
}
DEFAULT_MODE = "regional"  # docs/benchmarks.md: DiT-XL/2 compiled in 24.9 s vs 66.7 s full, step within 2%
BACKEND = "inductor"
RECOMPILE_LIMIT = 64  # graphs per code object before dynamo falls back to eager (torch's default: 8); bench
#                       compiles one per model width x input shape, which 8 does not cover for several variants


def check_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise choice_error("--compile-mode", mode, COMPILE_MODES)


def one_line(err: BaseException) -> str:
    """An exception as one short line: its type and the last non-empty line of its message."""
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    text = next((l for l in reversed(lines) if not l.startswith(("Set TORCH", "You can suppress", "To "))),
                lines[-1] if lines else "")
    return f"{type(err).__name__}: {text}"[:240]


def preflight(device: str) -> float:
    """Compile and run one tiny function on `device`; its seconds. CompileError when inductor cannot build kernels
    here (on CPU it needs a C++ compiler: g++, or $CXX)."""
    t0 = time.perf_counter()
    try:
        fn = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend=BACKEND, dynamic=False)
        out = fn(torch.ones(8, device=device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if not torch.allclose(out.cpu(), torch.sin(torch.ones(8)) * 2 + 1):
            raise RuntimeError("a compiled test kernel returned wrong values")
    except Exception as e:  # inductor raises many types (InductorError, BackendCompilerFailed, CppCompileError, ...)
        need = "a C++ compiler (g++, or set $CXX)" if device == "cpu" else "Triton and a working CUDA toolchain"
        raise CompileError(f"--compile: torch.compile ({BACKEND}) cannot build kernels on {device} "
                           f"({one_line(e)}); it needs {need}; install it or run without --compile") from None
    return time.perf_counter() - t0


def graph_count() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


COMPILED_FLAG = "_ditkit_compiled"  # set on a module while its compiled forward is installed


def _contiguous(compiled: Callable) -> Callable:
    """`compiled` with its tensor arguments made contiguous (a no-op for most): block 0's hidden states are a
    transposed view and the sampler's timestep an expanded one, and dynamo guards on strides."""
    def c(v):
        return v.contiguous() if isinstance(v, torch.Tensor) else v

    def forward(*args, **kwargs):
        return compiled(*(c(a) for a in args), **{k: c(v) for k, v in kwargs.items()})
    return forward


@dataclass
class Compiled:
    """The compiled forwards of one bundle's transformer (module -> forward), installed only while active()."""
    mode: str
    targets: list[tuple[nn.Module, Callable]] = field(default_factory=list)
    note: str | None = None  # e.g. why a full compile became regional

    @contextlib.contextmanager
    def active(self):
        """The modules run their compiled forwards inside (an instance attribute over the class's forward; the
        step accelerators wrap whatever forward is installed, and put it back)."""
        saved = [m.__dict__.get("forward") for m, _ in self.targets]
        for m, fwd in self.targets:
            m.forward = fwd
            m.__dict__[COMPILED_FLAG] = True  # ops.sample.row_floor leaves compiled regions alone
        try:
            yield self
        finally:
            for (m, _), prev in zip(self.targets, saved):
                m.__dict__.pop(COMPILED_FLAG, None)
                if prev is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = prev

    def wrap(self, fn: Callable) -> Callable:
        """`fn` run with the compiled forwards installed."""
        def run():
            with self.active():
                return fn()
        return run


def _accelerated(bundle) -> bool:
    """The bundle carries a step accelerator (a cache policy or a feedback module) that replaces blocks per step."""
    return bool((bundle.manifest or {}).get("cache")) or getattr(bundle, "feedback", None) is not None


def plan(bundle, mode: str = DEFAULT_MODE) -> tuple[Compiled | None, str | None]:
    """(the compiled forwards of the bundle's transformer, None) or (None, why it cannot be compiled). Nothing is
    compiled yet: dynamo compiles on the first call, per input shape."""
    import torch._dynamo

    check_mode(mode)
    from ditkit.formats.onnx_bundle import OnnxModule

    tr = bundle.transformer
    if not isinstance(tr, nn.Module) or isinstance(tr, OnnxModule):
        return None, (f"the transformer is run by onnxruntime ({type(tr).__name__}), not PyTorch; torch.compile "
                      "applies to the PyTorch backend only")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    note = None
    if mode == "full" and _accelerated(bundle):
        mode, note = "regional", ("compiled regionally: the bundle's step accelerator (cache policy or feedback "
                                  "module) replaces blocks per step, which a full-model graph would recompile for")
    if mode == "full":
        return Compiled("full", [(tr, torch.compile(tr.forward, backend=BACKEND, dynamic=False))]), None
    fam = bundle.family
    blocks = [b for st in fam.stacks for b in (getattr(tr, st.attr, None) or [])]
    if not blocks:
        return None, f"the {fam.name} transformer has no block stack to compile regionally; use --compile-mode full"
    targets = [(b, _contiguous(torch.compile(b.forward, backend=BACKEND, dynamic=False))) for b in blocks]
    fb = getattr(bundle, "feedback", None)
    copy = getattr(getattr(fb, "module", None), "block", None)
    if isinstance(copy, nn.Module):  # the feedback module's block copy runs at partial steps: compiled too
        targets.append((copy, _contiguous(torch.compile(copy.forward, backend=BACKEND, dynamic=False))))
    return Compiled("regional", targets, note), None


@dataclass
class Warmup:
    """What the first compiled call of a run cost, and the check that nothing recompiles after it."""
    seconds: float
    graphs: int  # graphs dynamo built during the warm-up
    graph_breaks: int
    error: str | None = None  # the warm-up failed: the model runs eager


def warm_up(compiled: Compiled, call: Callable[[], object], sync: Callable[[], None] = lambda: None) -> Warmup:
    """Run `call` once with the compiled forwards installed (dynamo compiles here); a failure is kept as the reason
    (the model then runs eager), never raised."""
    g0, b0 = graph_count(), graph_breaks()
    t0 = time.perf_counter()
    try:
        with compiled.active():
            call()
            sync()
    except Exception as e:  # a module dynamo or inductor rejects: report it, run eager
        return Warmup(round(time.perf_counter() - t0, 3), graph_count() - g0, graph_breaks() - b0, one_line(e))
    return Warmup(round(time.perf_counter() - t0, 3), graph_count() - g0, graph_breaks() - b0)


def compile_for_run(bundle, mode: str, device: str, backend: str, first_call: Callable[[], object] | None,
                    sync: Callable[[], None] = lambda: None) -> tuple[Compiled | None, dict]:
    """generate's --compile: preflight, plan, then warm up on `first_call` (the run's first batch, one step).
    (the compiled forwards to run with, or None: eager; the report's `compile` entry)."""
    note = {"applied": False, "mode": mode, "backend": BACKEND, "dynamic": False, "reason": None, "note": None,
            "warmup_seconds": None, "graphs": 0, "graph_breaks": 0, "graphs_after_warmup": 0}
    if backend != "pytorch":
        note["reason"] = f"the {backend} backend runs the transformer; torch.compile applies to the PyTorch backend"
        return None, note
    preflight(device)
    compiled, why = plan(bundle, mode)
    if compiled is None:
        note["reason"] = why
        return None, note
    note.update(mode=compiled.mode, note=compiled.note)
    if first_call is not None:
        w = warm_up(compiled, first_call, sync)
        note.update(warmup_seconds=w.seconds, graphs=w.graphs, graph_breaks=w.graph_breaks)
        if w.error is not None:
            note["reason"] = f"torch.compile failed on this model ({w.error}); it ran eager"
            return None, note
    note["applied"] = True
    return compiled, note
