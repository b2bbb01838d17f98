"""taylorseer (diffusers TaylorSeer): every block's output is computed every `cache_interval` steps and
forecast by a first-order Taylor series in between (diffusers' defaults otherwise: 3 warm-up steps). The hooked
modules are the family's blocks (`Family.stacks`): diffusers' default patterns look for `...attn` module names,
which match no DiT or PixArt module (their attentions are attn1/attn2), so the hooks would do nothing there."""
from __future__ import annotations

from .methods import Knob

SOURCE = "diffusers"
KNOB = Knob("cache_interval", 1, 0, integer=True)  # hi 0: up to the step count


def params(fitted, value, steps) -> dict:
    return {"cache_interval": int(value)}


def runtime(bundle, params, steps, guidance):
    import torch
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    from .stack import hooked_predict

    pats = []  # the family's blocks, a last block built differently (SD3's, no text stream out) left to run
    for s in bundle.family.stacks:
        n = len(getattr(bundle.transformer, s.attr))
        pats += [rf"{s.attr}\.{i}" for i in range(n - 1 if s.keep_last and n >= 2 else n)]
    cfg = TaylorSeerCacheConfig(cache_interval=int(params["cache_interval"]), max_order=1,
                                taylor_factors_dtype=torch.float32, cache_identifiers=pats)
    return lambda: hooked_predict(bundle, guidance, steps, lambda tr: apply_taylorseer_cache(tr, cfg),
                                  (_TAYLORSEER_CACHE_HOOK,))
