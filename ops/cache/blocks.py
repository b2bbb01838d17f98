"""blocks (ditkit): the per-step block-range policy of ops/cache/policy.py, searched by greedy rounds
(ops/cache/calibrate.py's `_greedy`): at step i, blocks [a, b) reuse their last kept residuals."""
from __future__ import annotations

from .methods import Knob

SOURCE = "ditkit"
KNOB = Knob("greedy rounds", 0, 0)  # not a scalar: the greedy rounds choose a range per step


def unsupported(bundle) -> str | None:
    if bundle.family.two_stream:
        return (f"the {bundle.family.name} family's blocks return (text, image) pairs, which the per-block "
                "policy does not handle; use forecast, teacache or fbcache")
    return None


def params(fitted, value, steps) -> dict:
    return {"skip": value}


def runtime(bundle, params, steps, guidance):
    from .policy import CachePolicy, cached_predict

    n = len(bundle.family.blocks(bundle.transformer))
    policy = CachePolicy(sampler="", steps=steps, num_blocks=n,
                         skip=[None if r is None else (int(r[0]), int(r[1])) for r in params["skip"]])
    return lambda: cached_predict(bundle, policy, guidance)
