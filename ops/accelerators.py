"""The step accelerators a sampler may apply, by name: what replaces the transformer call at some steps.

Each entry names the module that provides `predictor_for(bundle, sampler, steps, guidance) -> (factory or None,
note or None)`: a factory of the stateful `predict(x, t, cond)` for one denoise run where the bundle carries
that accelerator and it fits the run, and a note for reports. The sampler (ops.generate) and bench ask this
registry; they import no accelerator by name, and the accelerators' modules are imported only when asked.
"""
from __future__ import annotations

import importlib
from typing import Callable

from ditkit.formats.errors import choice_error

# name -> module with predictor_for; the first that yields a predictor wins (feedback and caching do not stack)
ACCELERATORS: dict[str, str] = {
    "feedback": "ditkit.ops.feedback",  # a feedback module (distill --mode feedback)
    "cache": "ditkit.ops.cache.policy",  # a step-caching policy (ditkit cache)
}


def step_predictor(bundle, sampler: str, steps: int, guidance: float,
                   **enabled: bool) -> tuple[Callable | None, dict]:
    """(a factory of the transformer-call replacement for one denoise run, or None; report notes by name): the
    first accelerator in ACCELERATORS that the bundle carries and that fits the run. `enabled` switches
    accelerators off by name (cache=False); every one is on by default."""
    for name in enabled:
        if name not in ACCELERATORS:
            raise choice_error("accelerator", name, ACCELERATORS)
    notes, make = {}, None
    for name, module in ACCELERATORS.items():
        if not enabled.get(name, True):
            continue
        factory, note = importlib.import_module(module).predictor_for(bundle, sampler, steps, guidance)
        if note is not None:
            notes[name] = note
        if make is None and factory is not None:
            make = factory
    return make, notes
