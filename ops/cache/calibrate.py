"""cache(bundle, CacheConfig) -> (bundle, CacheReport): calibrate a step-caching method to a target speedup.

Every method (ops/cache/methods.CACHE_METHODS) is calibrated the same way (no hand constants; only the target
speedup and the calibration size):
  1. the calibration set: `images` seeded trajectories of the model's own sampler, steps and guidance,
     cycling through the bundle's labels or prompts; the uncached run is the reference, and it records at every
     step the block chain's residual, the first block's modulated input and the model output (what
     TeaCache's polynomial, MagCache's ratios and ditkit's forecast schedule are fitted on: the method's `fit`);
  2. the cost model: for one image (bench's batch-1 headline, where per-call overhead weighs most), one
     transformer call with every block run, one with every block skipped, and the VAE decode are timed
     (process CPU time on one thread, interleaved, medians); a run that leaves a share w of the block work
     (multiply-accumulates of the blocks' Linear layers that really ran, counted under any method's hooks)
     is predicted to cost steps * (t_skip_all + w * (t_full - t_skip_all)) + t_decode;
  3. the search: the method's one knob (threshold, interval or count) is bisected on the calibration
     trajectories to the slowest setting whose predicted speedup reaches the goal, each setting run once per
     method (a later search at another goal starts from the bracket the earlier ones found; `blocks` widens its
     per-step ranges in greedy rounds instead, see `_greedy`);
  4. the check: one image's denoise + decode is timed with and without the method (what bench reports per
     image); a measured speedup short of the target raises the goal by the shortfall and the search goes on
     (MEASURE_ATTEMPTS searches at most);
  `timing=False` (`--no-timing`) counts instead of timing: the cost model of step 2 is the FLOPs of the same
  three calls (FlopCounterMode) and step 4 is not run, so the policy depends only on the model, the settings
  and the seed, never on the machine's load (reproducible builds); its speedup is the FLOP prediction, an
  upper bound of what a run measures (it leaves out per-call overhead), and the report says so;
  5. the result: the setting found runs on the calibration trajectories, its decoded images against the
     uncached ones (PSNR). `--method auto` does 1-5 for every method that supports the bundle and keeps the
     best PSNR among those whose measured speedup reached the target.
The policy is for one (sampler, steps); generate and bench apply it only at those settings.
"""
from __future__ import annotations

from typing import ClassVar

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ditkit.formats.errors import ConfigError, check_options, choice_error
from ditkit.ops.config import OpConfig

from ..flops import call_flops
from ..generate import GenerateConfig
from ..geometry import conditions, latent_hw, settings
from ..runtime import image_speedup
from ..sample import SAMPLERS, decode, denoise, image_noise, make_scheduler, padded, pad_rows
from ..timing import cpu_ms
from .methods import CACHE_METHODS, METHOD_CHOICES, method
from .policy import BlockCache, CachePolicy, MethodPolicy
from .stack import StackCache, WorkMeter


MAX_CHUNKS = 4  # blocks: candidate ranges are built from at most this many groups of blocks (10 ranges)
ROUNDS = 3  # blocks: greedy rounds: each takes a third of the remaining saving, then re-measures staleness
MEASURE_ATTEMPTS = 3  # searches: each ends with an end-to-end measurement; a short one raises the goal
OVERSHOOT = 1.08  # a measured speedup this far above the target searches again for a slower, better setting
BISECT = 14  # bisection rounds of a float knob (log scale): the knob to ~1% of its range's ratio
# `auto` calibrates these (blocks' greedy search costs tens of times the others' calibration; ask for it by name)
AUTO_METHODS = tuple(m for m in CACHE_METHODS if m != "blocks")


@dataclass
class CacheConfig(OpConfig):
    TYPE: ClassVar[str] = "cache"

    target_speedup: float = 1.5  # end-to-end speedup per image to reach (predicted, then measured)
    method: str = "auto"  # auto: calibrate every method, keep the best quality at the target
    images: int = 4  # calibration trajectories (cycling through the labels or prompts); more = steadier fits
    steps: int | None = None  # default: the bundle's own
    sampler: str | None = None
    guidance: float | None = None
    prompts: list[str] | None = None  # text families: default the bundle's own prompts (its manifest defaults)
    seed: int = 1234  # calibration noise; a seed other than generate's default 0, so bench images are unseen
    timing_repeats: int = 9  # interleaved timing rounds of the cost model and the checks (medians)
    timing: bool = True  # False: FLOP cost model, no end-to-end check (reproducible; the speedup is predicted)

    def __post_init__(self):
        check_options(self)  # floats finite, seeds and counts in range (formats/errors.py)
        if not (isinstance(self.target_speedup, (int, float)) and math.isfinite(self.target_speedup)
                and self.target_speedup > 1.0):
            raise ConfigError(f"--target-speedup must be a number > 1 (got {self.target_speedup})")
        if self.method not in METHOD_CHOICES:
            raise choice_error("cache method", self.method, METHOD_CHOICES)
        if self.images < 1:
            raise ConfigError(f"--images must be >= 1 (got {self.images})")
        if self.steps is not None and not 2 <= self.steps <= 1000:
            raise ConfigError(f"--steps must be in 2..1000 for caching (got {self.steps})")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise choice_error("sampler", self.sampler, SAMPLERS)
        if self.timing_repeats < 1:
            raise ConfigError(f"--timing-repeats must be >= 1 (got {self.timing_repeats})")


@dataclass
class CacheReport:
    family: str
    method: str  # the method kept (for auto: the best PSNR at the target)
    sampler: str
    steps: int
    guidance: float
    num_blocks: int
    calibration_images: int
    target_speedup: float
    predicted_speedup: float  # from the timed cost model (the FLOP one with timing off)
    measured_speedup: float | None  # one image, end to end, CPU time (the last check); None with timing off
    flops_speedup: float | None  # blocks: from FlopCounterMode (no per-call overhead: an upper bound)
    block_work: float  # share of the blocks' work that runs (calibration set)
    skipped_block_steps: int  # blocks: sum over steps of skipped blocks; others: block calls not run
    total_block_steps: int
    latent_rel_error: float  # ||x_cached - x_ref|| / ||x_ref|| of the final latents, calibration set
    image_psnr: float | None  # decoded calibration images vs the uncached ones (dB, mean)
    params: dict = field(default_factory=dict)  # the method's settings (its knob found by the search)
    methods: list = field(default_factory=list)  # per method calibrated: knob, speedups, PSNR (or why not)
    rounds: list = field(default_factory=list)  # blocks: per greedy round, predicted speedup and step error
    checks: list = field(default_factory=list)  # per search: predicted and measured (one image) speedup
    cost_ms: dict = field(default_factory=dict)  # the timed cost model (ms values None with timing off)
    cost_unit: str = "ms"  # what the predicted speedups were computed from: "ms" (timed) or "flops" (counted)
    policy: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _ranges(n: int) -> list[tuple[int, int]]:
    """Contiguous block ranges built from min(n, MAX_CHUNKS) near-equal groups of blocks."""
    k = min(n, MAX_CHUNKS)
    edges = [round(j * n / k) for j in range(k + 1)]
    return [(edges[a], edges[b]) for a in range(k) for b in range(a + 1, k + 1)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _prompts(bundle, cfg: CacheConfig) -> list[str] | None:
    if bundle.family.conditioning == "class":
        return None
    prompts = cfg.prompts or bundle.defaults().get("prompts")
    if not prompts:
        raise ConfigError(f"the {bundle.family.name} family needs prompts for its calibration runs: pass --prompt "
                          "(or --embeddings)")
    return list(prompts)


class _Calib:
    def __init__(self, bundle, cfg: CacheConfig, embeddings=None):
        self.bundle, self.fam, self.tr = bundle, bundle.family, bundle.transformer
        self.sampler, self.steps, self.guidance = settings(
            bundle, GenerateConfig(steps=cfg.steps, sampler=cfg.sampler, guidance=cfg.guidance))
        make_scheduler(self.fam, bundle.scheduler, self.sampler)  # validates the sampler
        if self.steps < 2:
            raise ConfigError(f"caching needs at least 2 steps (the bundle samples with {self.steps})")
        n = padded(cfg.images)
        prompts = None if embeddings is not None and not cfg.prompts else _prompts(bundle, cfg)
        gcfg = GenerateConfig(num_images=n, steps=self.steps, sampler=self.sampler, guidance=self.guidance,
                              prompts=prompts)
        values, cond, uncond = conditions(bundle, gcfg, "cpu", embeddings)
        rows = [i % len(values) for i in range(n)]
        self.use_cfg = self.fam.uses_cfg(self.tr, self.guidance)
        if self.use_cfg and uncond is None:
            raise ConfigError(f"guidance {self.guidance} needs unconditional embeddings; the embeddings file has "
                              "no negative_* tensors (or pass --guidance 1)")
        pick = lambda d: None if d is None else {k: v[rows] for k, v in d.items()}  # noqa: E731
        self.cond, self.uncond = pick(cond), (pick(uncond) if self.use_cfg else None)
        h, w = latent_hw(bundle, None, None)
        self.noise = image_noise(cfg.seed, list(range(n)), (self.fam.latent_channels(self.tr), h, w))
        self.n_blocks = len(StackCache(self.fam, self.tr).blocks)
        self._cache = None

    @property
    def cache(self) -> BlockCache:  # blocks' per-block wrapper (one-stream families only)
        if self._cache is None:
            self._cache = BlockCache(self.fam, self.tr)
        return self._cache

    def sched(self):
        return make_scheduler(self.fam, self.bundle.scheduler, self.sampler)

    def denoise(self, predict=None, rows=None, snapshot=None, start=None) -> torch.Tensor:
        """The calibration set's final latents; `start=(i, latents, sched)` resumes at step i (ops.sample.denoise)."""
        first = lambda d: None if d is None or rows is None else {k: v[rows] for k, v in d.items()}  # noqa: E731
        noise = self.noise if rows is None else self.noise[rows]
        cond = self.cond if rows is None else first(self.cond)
        uncond = self.uncond if rows is None else first(self.uncond)
        sched = self.sched() if start is None else copy.deepcopy(start[2])
        return denoise(self.fam, self.tr, sched, noise, cond, uncond, self.guidance, self.steps,
                       predict=predict, snapshot=snapshot, start=None if start is None else start[:2])

    def record(self) -> tuple[torch.Tensor, list[dict]]:
        """The uncached run's final latents and, per step, t, the chain residual, the probe input, the output,
        and the sampler's state before the step (`start`, what `sensitivity` resumes from)."""
        sc = StackCache(self.fam, self.tr)
        recs, cur, starts = [], {}, []
        sc.record = lambda h0, e0, r_h, r_e: cur.update(r_h=r_h.detach(), r_e=None if r_e is None else r_e.detach())
        probe = getattr(sc.blocks[0], self.fam.cache_probe, None)

        def on_probe(mod, args, kwargs):
            if "probe" not in cur:
                x = args[0] if args else kwargs.get("hidden_states")
                cur["probe"] = x.detach()

        def predict(x, t, cond):
            cur.clear()
            cur["t"] = float(t.flatten()[0])
            out = self.fam.predict(self.tr, x, t, cond, self.guidance)
            cur["out"] = out.detach()
            recs.append(dict(cur))
            return out
        handle = probe.register_forward_pre_hook(on_probe, with_kwargs=True) if probe is not None else None
        try:
            with sc.hooked():
                ref = self.denoise(predict, snapshot=lambda i, x, sched: starts.append(
                    (i, x.clone(), copy.deepcopy(sched))))
        finally:
            if handle is not None:
                handle.remove()
        for rec, st in zip(recs, starts):
            rec["start"] = st
        return ref, recs

    def sensitivity(self, ref: torch.Tensor, recs: list[dict]) -> None:
        """recs[s]["weight"]: how much the final latents move per unit of chain-residual error at step s, measured
        by reusing step s-1's residual at step s alone (the error a cache makes there) on the uncached run; each
        such run resumes from the uncached run's state before step s (steps before s are the uncached ones)."""
        sc = StackCache(self.fam, self.tr)
        scale = float(torch.stack([r["r_h"].norm() for r in recs]).mean()) or 1.0
        for s in range(1, len(recs)):
            prev, step = recs[s - 1], {"i": s}

            def decide(h, e, s=s, prev=prev):
                if step["i"] != s or prev["r_h"].shape != h.shape:
                    return None
                r_e = prev.get("r_e")
                return h + prev["r_h"], (e + r_e if e is not None and r_e is not None and r_e.shape == e.shape else e)

            def predict(x, t, cond):
                out = self.fam.predict(self.tr, x, t, cond, self.guidance)
                step["i"] += 1
                return out
            sc.decide = decide
            with sc.hooked():
                out = self.denoise(predict, start=recs[s]["start"])
            err = float((prev["r_h"] - recs[s]["r_h"]).norm()) / scale
            recs[s]["weight"] = _rel(out, ref) / max(err, 1e-12)
        recs[0]["weight"] = max((r["weight"] for r in recs[1:]), default=1.0)

    def run(self, policy_skip: list, probe=None) -> torch.Tensor:
        """blocks: final latents under `policy_skip`; `probe(step, x, t, cond)` sees each step's inputs."""
        bc, fam, tr, g = self.cache, self.fam, self.tr, self.guidance
        bc.deltas = [None] * self.n_blocks
        step = {"i": 0}

        def predict(x, t, cond):
            i = step["i"]
            step["i"] += 1
            if probe is not None:
                probe(i, x, t, cond)
            bc.skip, bc.record = policy_skip[i], True
            return fam.predict(tr, x, t, cond, g)

        with bc.hooked():
            return self.denoise(predict)

    def call_with(self, x, t, cond, skip, record=False):
        """blocks: one model call with `skip`, deltas left as they are (unless record)."""
        bc = self.cache
        saved = bc.record
        bc.skip, bc.record = skip, record
        try:
            return self.fam.predict(self.tr, x, t, cond, self.guidance)
        finally:
            bc.record = saved

    def work(self, make_predict) -> tuple[torch.Tensor, int]:
        """(final latents, block multiply-accumulates that ran) of the calibration set under one method run."""
        meter = WorkMeter(self.fam, self.tr)
        try:
            out = self.denoise(make_predict())
        finally:
            meter.close()
        return out, meter.macs


def _cost_model(c: _Calib, repeats: int, timed: bool = True) -> dict:
    """Timed ms (unless not `timed`) and FLOPs of one image's full call, its all-blocks-skipped call (same
    inputs) and the decode call that a batch of one image makes; "unit" names the pair the predictions use."""
    captured = {}

    def predict(x, t, cond):
        if not captured:
            captured.update(x=x, t=t, cond=cond)
        return c.fam.predict(c.tr, x, t, cond, c.guidance)
    with torch.no_grad():
        ref = c.denoise(predict)
    n = c.noise.shape[0]
    rows = [0, n] if c.use_cfg else [0]  # one image's rows (cond + uncond with guidance)
    x, t, cond = captured["x"][rows], captured["t"][rows], {k: v[rows] for k, v in captured["cond"].items()}
    lat = pad_rows(ref[:1], 4)  # the VAE always decodes 4 latents per call (ops.sample.decode)
    sc = StackCache(c.fam, c.tr)
    kept = {}
    sc.record = lambda h0, e0, r_h, r_e: kept.update(r=(r_h, r_e))
    with torch.no_grad(), sc.hooked():
        full = lambda: c.fam.predict(c.tr, x, t, cond, c.guidance)  # noqa: E731
        full()
        r_h, r_e = kept["r"]

        def skip_all():
            sc.decide = lambda h, e: (h + r_h, e + r_e if r_e is not None and e is not None else e)
            try:
                return c.fam.predict(c.tr, x, t, cond, c.guidance)
            finally:
                sc.decide = None
        dec = lambda: decode(c.bundle.vae, lat)  # noqa: E731
        med = (cpu_ms({"full": full, "skip_all": skip_all, "decode": dec}, repeats) if timed
               else dict.fromkeys(("full", "skip_all", "decode")))
        flops = {k: call_flops(fn) for k, fn in (("full", full), ("skip_all", skip_all), ("decode", dec))}
    return {"full_ms": med["full"], "skip_all_ms": med["skip_all"], "decode_ms": med["decode"],
            "flops_full": flops["full"], "flops_skip_all": flops["skip_all"], "flops_decode": flops["decode"],
            "unit": "ms" if timed else "flops"}


def _costs(cost: dict) -> tuple[float, float, float]:
    """(full call, all-skipped call, decode) in the cost model's unit."""
    if cost["unit"] == "ms":
        return cost["full_ms"], cost["skip_all_ms"], cost["decode_ms"]
    return cost["flops_full"], cost["flops_skip_all"], cost["flops_decode"]


def _greedy(c: _Calib, skip: list, goal: float, spd, ranges, rounds: list) -> None:
    """Widen `skip` in place, round by round, until the predicted speedup reaches `goal` (or nothing is left)."""
    for rnd in range(ROUNDS * 4):
        now = spd(skip)
        if now >= goal:
            break
        # 1. every candidate widening of each step's skipped range, tried on this policy's own trajectory
        cands = []

        def probe(i, x, t, cond):
            if i == 0:
                return
            cur = skip[i]
            full_out = c.call_with(x, t, cond, None)
            for r in ranges:
                if cur is not None and not (r[0] <= cur[0] and cur[1] <= r[1] and r != cur):
                    continue  # a step's range only widens
                err = _rel(c.call_with(x, t, cond, r), full_out)
                gain = spd(skip[:i] + [r] + skip[i + 1:]) - now
                if gain > 0:
                    cands.append((err / gain, err, i, r))
        c.run(skip, probe=probe)
        if not cands:
            break
        # 2. cheapest error per saving first, up to this round's share of the remaining saving
        cands.sort(key=lambda z: (z[0], z[2], z[3]))
        share = now + (goal - now) / max(ROUNDS - rnd, 1)
        taken, errs = set(), []
        for _, err, i, r in cands:
            if i in taken:
                continue
            skip[i] = r
            taken.add(i)
            errs.append(err)
            if spd(skip) >= min(share, goal) + 1e-9:
                break
        rounds.append({"predicted_speedup": round(spd(skip), 4), "steps_changed": len(taken),
                       "mean_step_error": round(float(np.mean(errs)), 5)})


def _speedup(skip: list, steps: int, n_blocks: int, full: float, skip_all: float, dec: float) -> float:
    blk = max(full - skip_all, 0.0) / n_blocks
    base = steps * full + dec
    saved = sum((r[1] - r[0]) * blk for r in skip if r is not None)
    return base / max(base - saved, 1e-9)


def _work_speedup(work: float, steps: int, cost: dict) -> float:
    """Predicted speedup of a run that leaves a share `work` of the block work (step 2 of the module note)."""
    full, skip_all, dec = _costs(cost)
    base = steps * full + dec
    return base / max(steps * (skip_all + work * max(full - skip_all, 0.0)) + dec, 1e-9)


def _measured(c: _Calib, make_predict, repeats: int) -> float:
    first = lambda d: None if d is None else {k: v[:1] for k, v in d.items()}  # noqa: E731
    return image_speedup(c.bundle, c.noise[:1], first(c.cond), first(c.uncond), c.sampler, c.steps, c.guidance,
                         make_predict, repeats)


def _psnr(bundle, out, ref) -> float | None:
    if bundle.vae is None:
        return None
    from ..metrics import psnr

    a, b = decode(bundle.vae, out), decode(bundle.vae, ref)
    return round(float(np.mean([psnr(x, y) for x, y in zip(a, b)])), 3)


class _Short(Exception):
    """A method that cannot reach the target on this model (the reason is its message)."""


def _knob_values(knob, steps):
    hi = knob.hi or steps
    if knob.integer:
        vals = list(range(int(knob.lo), int(hi) + 1))
        return vals if knob.faster_when_higher else vals[::-1]
    return None


def _search_knob(c: _Calib, mod, fitted: dict, goal: float, spd_of, err_of, seen: dict) -> tuple[dict, float]:
    """The slowest setting of `mod`'s knob whose predicted speedup reaches `goal`: (params, predicted).

    Bisection along the knob from its slow end to its fast end (integer knobs over their values, float knobs on a
    log scale to 1/2**BISECT of the range), the predicted speedup taken to grow along it. `seen` (knob position ->
    predicted speedup, kept across the searches of one method) narrows the first bracket, so a search again at a
    raised or lowered goal runs only what it has not. A method with `candidates` offers several settings per knob
    value that do the same block work (forecast: schedules of n full steps): the first one is what the bisection
    times, and at the value found the one with the least calibration error among those reaching the goal runs."""
    knob, steps = mod.KNOB, c.steps
    first = ((lambda v: mod.candidates(fitted, v, steps)[0]) if hasattr(mod, "candidates")
             else (lambda v: mod.params(fitted, v, steps)))
    ints = _knob_values(knob, steps)
    if ints is not None:  # positions 0..len-1, slow to fast
        value = lambda k: ints[int(k)]  # noqa: E731
        lo, hi, width = -1.0, float(len(ints) - 1), 1.0
    else:
        value = math.exp
        lo, hi = math.log(knob.lo), math.log(knob.hi)
        width = (hi - lo) / 2 ** BISECT

    def spd(k):
        if k not in seen:
            seen[k] = spd_of(first(value(k)))
        return seen[k]
    s_hi = spd(hi)
    if s_hi < goal:
        raise _Short(f"{knob.name} {value(hi):.4g} reaches {s_hi:.2f}x predicted, short of the {goal:.2f}x goal")
    # the tightest bracket the earlier searches of this method know
    lo = max([k for k, v in seen.items() if v < goal and k < hi] + [lo])
    hi = min(k for k, v in seen.items() if v >= goal)
    while hi - lo > width:
        mid = (lo + hi) / 2
        if ints is not None:
            mid = float(math.floor(mid))
            if mid <= lo:
                break
        if spd(mid) >= goal:
            hi = mid
        else:
            lo = mid
    v = value(hi)
    if not hasattr(mod, "candidates"):
        p = mod.params(fitted, v, steps)
        return p, spd_of(p)
    ok = [p for p in mod.candidates(fitted, v, steps) if spd_of(p) >= goal] or [first(v)]
    p = min(ok, key=err_of)
    return p, spd_of(p)


def _calibrate_knob(c: _Calib, name: str, cfg: CacheConfig, cost: dict, ref, recs, ref_macs) -> dict:
    """One method through steps 3-5 of the module note: its result row (raises _Short when out of reach)."""
    mod = method(name)
    fitted = mod.fit(recs, c.steps)
    memo = {}

    def run(p):
        key = repr(sorted(p.items()))
        if key not in memo:
            with torch.no_grad():
                out, macs = c.work(mod.runtime(c.bundle, p, c.steps, c.guidance))
            memo[key] = (out, macs / max(ref_macs, 1))
        return memo[key]
    spd_of = lambda p: _work_speedup(run(p)[1], c.steps, cost)  # noqa: E731
    err_of = lambda p: _rel(run(p)[0], ref)  # noqa: E731
    goal, checks, kept, seen = cfg.target_speedup, [], None, {}
    for _ in range(MEASURE_ATTEMPTS):
        try:
            p, pred = _search_knob(c, mod, fitted, goal, spd_of, err_of, seen)
        except _Short as e:
            if kept is None and checks:  # the goal was raised by a short measurement
                m = checks[-1]
                raise _Short(f"{e}, raised after {m['predicted_speedup']:.2f}x predicted measured "
                             f"{m['measured_speedup']:.2f}x") from None
            if kept is None:
                raise
            break
        if not cfg.timing:  # the FLOP prediction is the result: nothing to measure, nothing to correct
            kept = (p, {"predicted_speedup": round(pred, 4), "measured_speedup": None})
            checks.append(kept[1])
            break
        with torch.no_grad():
            meas = _measured(c, mod.runtime(c.bundle, p, c.steps, c.guidance), cfg.timing_repeats)
        checks.append({"predicted_speedup": round(pred, 4), "measured_speedup": round(meas, 4)})
        if meas >= cfg.target_speedup:
            kept = (p, checks[-1])
            if meas <= cfg.target_speedup * OVERSHOOT:
                break
        # the cost model's error is the measured / predicted ratio: scale the goal by it (both ways: a short
        # measurement raises the goal, an overshoot lowers it, keeping the last setting that reached the target)
        goal = pred * cfg.target_speedup / meas
    if kept is None:
        raise _Short(f"measured {checks[-1]['measured_speedup']:.2f}x after {len(checks)} searches")
    p, last = kept
    checks.append({"kept": last})
    out, work = run(p)
    return {"method": name, "params": p, "predicted_speedup": last["predicted_speedup"],
            "measured_speedup": last["measured_speedup"], "block_work": round(work, 4),
            "latent_rel_error": round(_rel(out, ref), 6), "image_psnr": _psnr(c.bundle, out, ref), "checks": checks}


def _calibrate_blocks(c: _Calib, cfg: CacheConfig, cost: dict, ref) -> dict:
    S, L = c.steps, c.n_blocks
    spd = lambda skip: _speedup(skip, S, L, *_costs(cost))  # noqa: E731
    fspd = lambda skip: _speedup(skip, S, L, cost["flops_full"], cost["flops_skip_all"], cost["flops_decode"])  # noqa
    if spd([None] + [(0, L)] * (S - 1)) < cfg.target_speedup:
        raise _Short("skipping every block at every step but the first is predicted short of the target")
    ranges = _ranges(L)
    skip: list = [None] * S
    rounds, checks, goal = [], [], cfg.target_speedup
    for attempt in range(MEASURE_ATTEMPTS):
        _greedy(c, skip, goal, spd, ranges, rounds)
        if spd(skip) < goal:
            break
        if not cfg.timing:
            checks.append({"predicted_speedup": round(spd(skip), 4), "measured_speedup": None})
            break
        # the policy end to end, against the uncached run (what bench measures): the cost model misses
        # whatever a skipped step still costs, so a short measurement raises the goal and the search goes on
        policy = CachePolicy(sampler=c.sampler, steps=S, num_blocks=L, skip=list(skip))
        from .policy import cached_predict

        measured = _measured(c, lambda: cached_predict(c.bundle, policy, c.guidance), cfg.timing_repeats)
        checks.append({"predicted_speedup": round(spd(skip), 4), "measured_speedup": round(measured, 4)})
        if measured >= cfg.target_speedup:
            break
        goal = spd(skip) * cfg.target_speedup / measured
    if not checks or (cfg.timing and checks[-1]["measured_speedup"] < cfg.target_speedup):
        got = f"{checks[-1]['measured_speedup']:.2f}x measured" if checks else f"{spd(skip):.2f}x predicted"
        raise _Short(f"reached only {got}")
    out = c.run(skip)
    policy = CachePolicy(sampler=c.sampler, steps=S, num_blocks=L, skip=skip)
    return {"method": "blocks", "params": {"skip": policy.to_dict()["skip"]},
            "predicted_speedup": checks[-1]["predicted_speedup"], "measured_speedup": checks[-1]["measured_speedup"],
            "block_work": round(1 - policy.skipped_blocks() / (S * L), 4), "latent_rel_error": round(_rel(out, ref), 6),
            "image_psnr": _psnr(c.bundle, out, ref), "checks": checks, "rounds": rounds,
            "flops_speedup": round(fspd(skip), 4), "skipped_block_steps": policy.skipped_blocks()}


@torch.no_grad()
def cache(bundle, cfg: CacheConfig, embeddings=None, log=None) -> tuple[object, CacheReport]:
    """Calibrate a caching method for `bundle`; returns the bundle (weights untouched, policy in
    bundle.manifest["cache"]) and the report."""
    from ditkit.ops.feedback import refuse

    refuse(bundle, "ditkit cache", "this bundle has a feedback module (distill --mode feedback); feedback and step "
                                   "caching do not stack: cache the model it was distilled from instead")
    t_start = time.perf_counter()
    names = AUTO_METHODS if cfg.method == "auto" else (cfg.method,)
    if cfg.method != "auto":
        why = method(cfg.method).unsupported(bundle)
        if why:
            raise ConfigError(f"--method {cfg.method}: {why}")
    c = _Calib(bundle, cfg, embeddings)
    S, L = c.steps, c.n_blocks
    cost = _cost_model(c, cfg.timing_repeats, timed=cfg.timing)
    best = _work_speedup(0.0, S, cost)
    if best < cfg.target_speedup:
        raise ConfigError(f"--target-speedup {cfg.target_speedup} is out of reach for this model: skipping every "
                          f"block at every step would give {best:.2f}x (the rest is decode and per-step "
                          "overhead); choose a lower target")
    meter = WorkMeter(c.fam, c.tr)
    try:
        ref, recs = c.record()
    finally:
        meter.close()
    if any(getattr(method(n), "NEEDS_SENSITIVITY", False) for n in names):
        c.sensitivity(ref, recs)
    rows = []
    for name in names:
        mod = method(name)
        why = mod.unsupported(bundle)
        if why:
            rows.append({"method": name, "source": mod.SOURCE, "skipped": why})
            continue
        if log is not None:
            log(f"calibrating {name} ({mod.SOURCE}) to {cfg.target_speedup}x")
        t0 = time.perf_counter()
        try:
            row = (_calibrate_blocks(c, cfg, cost, ref) if name == "blocks"
                   else _calibrate_knob(c, name, cfg, cost, ref, recs, meter.macs))
        except _Short as e:
            row = {"method": name, "skipped": f"cannot reach {cfg.target_speedup}x: {e}"}
        rows.append({"source": mod.SOURCE, **row, "seconds": round(time.perf_counter() - t0, 2)})
    done = [r for r in rows if "skipped" not in r]
    if not done:
        why = "; ".join(f"{r['method']}: {r['skipped']}" for r in rows)
        raise ConfigError(f"calibration reached --target-speedup {cfg.target_speedup} with no method ({why}); "
                          "choose a lower target")
    key = lambda r: (r["image_psnr"] if r["image_psnr"] is not None else -r["latent_rel_error"])  # noqa: E731
    win = max(done, key=key)
    policy = MethodPolicy(method=win["method"], sampler=c.sampler, steps=S, num_blocks=L, params=win["params"])
    bundle.manifest = {**(bundle.manifest or {}), "cache": policy.to_dict()}
    skipped = win.get("skipped_block_steps", round((1 - win["block_work"]) * S * L))
    slim = lambda r: {k: v for k, v in r.items() if k not in ("params", "rounds")} | (  # noqa: E731
        {"params": {k: v for k, v in r["params"].items() if k in ("threshold", "cache_interval", "skip_range",
                                                                    "predicted_error")}
         | ({"full_steps": sum(r["params"]["full"])} if "full" in r.get("params", {}) else {})}
        if "params" in r else {})
    report = CacheReport(
        family=bundle.family.name, method=win["method"], sampler=c.sampler, steps=S, guidance=c.guidance,
        num_blocks=L, calibration_images=c.noise.shape[0], target_speedup=cfg.target_speedup,
        predicted_speedup=win["predicted_speedup"], measured_speedup=win["measured_speedup"],
        flops_speedup=win.get("flops_speedup"), block_work=win["block_work"], skipped_block_steps=int(skipped),
        total_block_steps=S * L, latent_rel_error=win["latent_rel_error"], image_psnr=win["image_psnr"],
        params=win["params"], methods=[slim(r) for r in rows], rounds=win.get("rounds", []), checks=win["checks"],
        cost_ms={k: (round(v, 4) if k.endswith("_ms") and v is not None else v) for k, v in cost.items()
                 if k != "unit"}, cost_unit=cost["unit"],
        policy=policy.to_dict(), seconds=round(time.perf_counter() - t_start, 2))
    return bundle, report
