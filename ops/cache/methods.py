"""CACHE_METHODS: the step-caching methods `ditkit cache --method` calibrates, one module each.

A method module provides:
  SOURCE: "ditkit" (written here) or "diffusers" (diffusers.hooks driven with a cache context, ops/cache/stack.py);
  KNOB: the one setting the calibration searches to reach the target speedup (a threshold or an interval);
  unsupported(bundle) -> str | None: why the method cannot run on this bundle (optional: runs everywhere);
  fit(records, steps) -> dict: what the method learns from the uncached calibration trajectories before the
      search (TeaCache's polynomial, MagCache's magnitude ratios, ditkit's forecast errors) (optional: {});
  params(fitted, value, steps) -> dict: the JSON-able settings at knob `value` (what the manifest stores);
  runtime(bundle, params, steps, guidance) -> () -> predict: a factory of the stateful transformer-call
      replacement for one denoise run.
`blocks` (the per-step block-skip policy) searches with its own greedy rounds (ops/cache/calibrate.py).
Modules are imported only when asked, so adding a method is one module and one line here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ditkit.formats.errors import choice_error

CACHE_METHODS: dict[str, str] = {
    "blocks": "ditkit.ops.cache.blocks",  # ditkit: calibrated per-step block ranges reusing residuals (FORA/Delta-DiT)
    "forecast": "ditkit.ops.cache.forecast",  # ditkit: calibrated full steps + first-order residual forecast
    "teacache": "ditkit.ops.cache.teacache",  # ditkit: TeaCache, its polynomial fitted on the model's trajectories
    "fbcache": "ditkit.ops.cache.fbcache",  # diffusers FirstBlockCache
    "magcache": "ditkit.ops.cache.magcache",  # diffusers MagCache, its ratios from the model's trajectories
    "taylorseer": "ditkit.ops.cache.taylorseer",  # diffusers TaylorSeer (first order)
    "pab": "ditkit.ops.cache.pab",  # diffusers Pyramid Attention Broadcast
}
METHOD_CHOICES = ("auto", *CACHE_METHODS)


@dataclass(frozen=True)
class Knob:
    name: str
    lo: float
    hi: float
    integer: bool = False
    faster_when_higher: bool = True  # a higher value skips more


def _runs_everywhere(bundle) -> str | None:
    return None


def _fits_nothing(records, steps) -> dict:
    return {}


# what a method module may leave out: `method` gives it these
DEFAULTS = {"unsupported": _runs_everywhere, "fit": _fits_nothing}


def method(name: str):
    """The module of method `name`, with DEFAULTS for what it leaves out."""
    if name not in CACHE_METHODS:
        raise choice_error("cache method", name, CACHE_METHODS)
    mod = importlib.import_module(CACHE_METHODS[name])
    for attr, default in DEFAULTS.items():
        if not hasattr(mod, attr):
            setattr(mod, attr, default)
    return mod
