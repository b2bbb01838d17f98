"""forecast (ditkit): full steps chosen on the model's own trajectories, a first-order forecast of the block
chain's residual in between.

At a full step the block chain runs and its residual R = h_out - h_in (both streams for two-stream blocks) is
kept with the step's timestep t. At any other step no block runs: the chain returns h_in + R', where R' is the
forecast from the last two full steps p, l (TaylorSeer's first order, in timesteps):
    R'(t) = R_l + (R_l - R_p) * (t - t_l) / (t_l - t_p),
or R_l alone (zero order, FORA's reuse) where that was the smaller error on the calibration trajectories.

Which steps are full: the uncached calibration trajectories record R at every step; the error of forecasting
step s from full steps (p, l), ||R'_s - R_s|| / mean ||R||, is computed for every p < l < s, and a dynamic
program picks the `full_steps` full steps (step 0 always) that minimize the summed error. The knob the
calibration searches is the number of full steps; the schedule is fixed per step, so its speed is the same on
any batch (dynamic methods decide per batch).
"""
from __future__ import annotations

import math

import torch

from .methods import Knob

SOURCE = "ditkit"
NEEDS_SENSITIVITY = True  # the calibration measures each step's weight (calibrate._Calib.sensitivity)
KNOB = Knob("full_steps", 2, 0, integer=True, faster_when_higher=False)  # hi 0: the step count


def _flat(rec) -> torch.Tensor:
    parts = [rec["r_h"].flatten().float()]
    if rec.get("r_e") is not None:
        parts.append(rec["r_e"].flatten().float())
    return torch.cat(parts)


def fit(records, steps) -> dict:
    """err1[p][l][s] (first order from p, l) and err0[l][s] (zero order from l), relative to mean ||R||."""
    r = [_flat(x) for x in records]
    t = [float(x["t"]) for x in records]
    scale = float(torch.stack([v.norm() for v in r]).mean()) or 1.0
    S = len(r)
    w = [float(x.get("weight", 1.0)) for x in records]
    err0 = [[0.0] * S for _ in range(S)]
    err1 = {}
    for l in range(S):
        for s in range(l + 1, S):
            err0[l][s] = w[s] * float((r[l] - r[s]).norm()) / scale
    for p in range(S):
        for l in range(p + 1, S):
            slope = (r[l] - r[p]) / (t[l] - t[p]) if t[l] != t[p] else torch.zeros_like(r[l])
            for s in range(l + 1, S):
                err1[(p, l, s)] = w[s] * float((r[l] + slope * (t[s] - t[l]) - r[s]).norm()) / scale
    return {"err0": err0, "err1": err1, "steps": S}


def _schedule(fitted, n_full: int):
    """(full step flags, forecast order per step): the DP over the last two full steps."""
    S, err0, err1 = fitted["steps"], fitted["err0"], fitted["err1"]
    n_full = max(1, min(n_full, S))

    def e(p, l, s):  # the best order's error forecasting s from full steps (p, l); p = -1: only l exists
        z = err0[l][s]
        return min(z, err1[(p, l, s)]) if p >= 0 else z

    def gap(p, l, m):  # steps l+1 .. m-1 forecast from (p, l)
        return sum(e(p, l, s) for s in range(l + 1, m))
    INF = math.inf
    # best[(p, l)] = (cost, path) with k full steps so far, the last two being p, l
    best = {(-1, 0): (0.0, (0,))}
    for _ in range(n_full - 1):
        nxt = {}
        for (p, l), (c, path) in best.items():
            for m in range(l + 1, S):
                cc = c + gap(p, l, m)
                if cc < nxt.get((l, m), (INF,))[0]:
                    nxt[(l, m)] = (cc, path + (m,))
        if not nxt:
            break
        best = nxt
    cost, path = min(((c + gap(p, l, S), path) for (p, l), (c, path) in best.items()), key=lambda z: z[0])
    full = [i in path for i in range(S)]
    order, last = [], []
    for i in range(S):
        if full[i]:
            order.append(None)
            last = (last + [i])[-2:]
        else:
            p, l = (last[0], last[1]) if len(last) == 2 else (-1, last[-1])
            order.append(1 if p >= 0 and err1[(p, l, i)] < err0[l][i] else 0)
    return full, order, cost


def params(fitted, value, steps) -> dict:
    full, order, cost = _schedule(fitted, int(value))
    return {"full": full, "order": order, "predicted_error": round(cost, 6)}


def _even(steps: int, n: int, warm: int) -> list[bool]:
    """`warm` full steps first, the rest of the n spread evenly over the remaining steps."""
    full = [i < warm for i in range(steps)]
    rest = n - warm
    for j in range(rest):
        full[min(warm + round(j * (steps - warm) / rest), steps - 1)] = True
    return full


def candidates(fitted, value, steps) -> list[dict]:
    """Schedules of `value` full steps that the calibration runs and compares by their measured error: the
    dynamic program's (it sums per-step errors, blind to how early errors compound) and even spacings after
    1-3 full warm-up steps (TaylorSeer's shape); each forecast step takes the order with the smaller error."""
    n = max(1, min(int(value), steps))
    out = [params(fitted, n, steps)]
    for warm in (1, 2, 3):
        if warm < n:
            full = _even(steps, n, warm)
            order, last = [], []
            for i, f in enumerate(full):
                if f:
                    order.append(None)
                    last = (last + [i])[-2:]
                else:
                    p, l = (last[0], last[1]) if len(last) == 2 else (-1, last[-1])
                    order.append(1 if p >= 0 and fitted["err1"][(p, l, i)] < fitted["err0"][l][i] else 0)
            out.append({"full": full, "order": order, "predicted_error": None})
    return out


def runtime(bundle, params, steps, guidance):
    from .stack import StackCache

    fam, tr = bundle.family, bundle.transformer
    full, order = list(params["full"]), list(params["order"])

    def make():
        sc = StackCache(fam, tr)
        hist: list = []  # (t, r_h, r_e) of the last two full steps
        state = {"step": 0, "t": 0.0}

        def record(h0, e0, r_h, r_e):
            hist.append((state["t"], r_h, r_e))
            del hist[:-2]

        def forecast(r_l, r_p, w):
            if r_l is None:
                return None
            return r_l if r_p is None or w is None else r_l + (r_l - r_p) * w

        def decide(h, e):
            i = state["step"]
            if i >= len(full) or full[i] or not hist:
                return None
            t, w = state["t"], None
            if order[i] == 1 and len(hist) == 2 and hist[1][0] != hist[0][0]:
                w = (t - hist[1][0]) / (hist[1][0] - hist[0][0])
            p = hist[0] if len(hist) == 2 else (None, None, None)
            rh = forecast(hist[-1][1], p[1], w)
            re_ = forecast(hist[-1][2], p[2], w)
            if rh.shape != h.shape:
                return None
            return h + rh, (e + re_ if (e is not None and re_ is not None and re_.shape == e.shape) else e)
        sc.decide, sc.record = decide, record

        def predict(x, t, cond):
            state["t"] = float(t.flatten()[0])
            with sc.hooked():
                out = fam.predict(tr, x, t, cond, guidance)
            state["step"] += 1
            return out
        return predict
    return make
