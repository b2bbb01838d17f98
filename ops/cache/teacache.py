"""teacache (ditkit; diffusers has none, diffusers #10374): TeaCache (Liu et al., arXiv 2411.19108).

The indicator is the relative L1 change, since the previous call, of the first block's timestep-modulated input
(what its attention reads: `Family.cache_probe`). TeaCache rescales it with a polynomial fitted to the relative
L1 change of the model output; its authors fit that polynomial per model on sampled trajectories, which is done
here on the model's own uncached calibration trajectories (numpy polyfit, degree 4, as the authors). The rescaled
changes accumulate; while the sum stays under `threshold` the whole block chain reuses its last residual
(zero order), else the chain runs and the sum restarts. The first and last steps always run. The polynomial
is clamped at 0 (a fitted quartic can dip below 0 near 0, which would let the sum shrink).
"""
from __future__ import annotations

import numpy as np

from .methods import Knob

SOURCE = "ditkit"
KNOB = Knob("threshold", 1e-3, 20.0)
DEGREE = 4  # the authors' polynomial degree


def _rel_l1(a, b) -> float:
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


def fit(records, steps) -> dict:
    x = [_rel_l1(c["probe"], p["probe"]) for p, c in zip(records, records[1:])]
    y = [_rel_l1(c["out"], p["out"]) for p, c in zip(records, records[1:])]
    deg = min(DEGREE, max(len(x) - 1, 0))
    coef = np.polyfit(np.asarray(x), np.asarray(y), deg) if len(x) > 1 else np.asarray([1.0, 0.0])
    return {"coefficients": [float(c) for c in coef]}


def params(fitted, value, steps) -> dict:
    return {"threshold": float(value), "coefficients": list(fitted["coefficients"])}


def runtime(bundle, params, steps, guidance):
    from .stack import StackCache

    fam, tr = bundle.family, bundle.transformer
    thr, poly = float(params["threshold"]), np.poly1d(params["coefficients"])

    def make():
        sc = StackCache(fam, tr)
        probe_mod = getattr(sc.blocks[0], fam.cache_probe)
        state = {"step": 0, "prev": None, "acc": 0.0, "r": None}

        def record(h0, e0, r_h, r_e):
            state["r"] = (r_h, r_e)

        def on_probe(mod, args, kwargs):
            if state.get("probed"):
                return None  # the probe reads the first attention call of the step only
            state["probed"] = True
            x = args[0] if args else kwargs.get("hidden_states")
            prev, state["prev"] = state["prev"], x.detach()
            i = state["step"]
            if prev is None or state["r"] is None or i == steps - 1 or prev.shape != x.shape:
                state["acc"] = 0.0
                return None
            state["acc"] += max(float(poly(_rel_l1(x, prev))), 0.0)
            if state["acc"] >= thr:
                state["acc"] = 0.0
                return None
            h, e = sc._in
            r_h, r_e = state["r"]
            if r_h.shape != h.shape:
                return None
            sc.replace(h + r_h, e + r_e if (e is not None and r_e is not None and r_e.shape == e.shape) else e)
        sc.record = record

        def predict(x, t, cond):
            state["probed"] = False
            handle = probe_mod.register_forward_pre_hook(on_probe, with_kwargs=True)
            try:
                with sc.hooked():
                    out = fam.predict(tr, x, t, cond, guidance)
            finally:
                handle.remove()
            state["step"] += 1
            return out
        return predict
    return make
