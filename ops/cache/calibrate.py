"""cache(bundle, CacheConfig) -> (bundle, CacheReport): calibrate a step-caching policy (ops.cache.policy).

How the policy is chosen (no hand constants; only the target speedup and the calibration size):
  1. the calibration set: `images` seeded trajectories of the model's own sampler, steps and guidance,
     cycling through the bundle's labels; the uncached run is the reference;
  2. the cost model: for one image (bench's batch-1 headline, where per-call overhead weighs most), one
     transformer call with every block run, one with every block skipped, and the VAE decode are timed
     (process CPU time on one thread, interleaved, medians), so a skipped block is worth
     (t_full - t_skip_all) / n_blocks of a step; FLOPs (ops.flops, attention included) are reported beside it;
  3. greedy rounds: the trajectories run under the current policy; at every step that still runs some
     blocks, each candidate (contiguous block range at this step) is tried against the full call on the
     same inputs, its error being the relative L2 distance of the model output. Candidates are ranked by
     error per unit of time saved and taken, cheapest first, until this round's share of the remaining
     saving is reached; the next round re-measures with the deltas the new policy really has (stale ones
     from earlier skipped steps included). Rounds stop when the predicted speedup reaches the target;
  4. the check: one image's denoise + decode is timed with and without the policy (what bench reports per
     image); a measured speedup short of the target raises the goal by the shortfall and the rounds go on
     (MEASURE_ATTEMPTS searches at most);
  5. the result: the final policy runs on the calibration trajectories and its error against the
     uncached run is measured (final latents, decoded images' PSNR).
The policy is for one (sampler, steps); generate and bench apply it only at those settings.
"""
from __future__ import annotations

from typing import ClassVar

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ditkit.formats.errors import ConfigError, check_options
from ditkit.ops.config import OpConfig

from ..flops import call_flops
from ..generate import GenerateConfig
from ..geometry import conditions, latent_hw, settings
from ..runtime import image_speedup
from ..sample import SAMPLERS, decode, denoise, image_noise, make_scheduler, padded, pad_rows
from ..timing import cpu_ms
from .policy import BlockCache, CachePolicy, cached_predict


MAX_CHUNKS = 4  # candidate ranges are built from at most this many groups of blocks (10 ranges: calibration cost)
ROUNDS = 3  # greedy rounds: each takes a third of the remaining saving, then re-measures staleness
MEASURE_ATTEMPTS = 3  # searches: each ends with an end-to-end measurement; a short one raises the goal


@dataclass
class CacheConfig(OpConfig):
    TYPE: ClassVar[str] = "cache"

    target_speedup: float = 1.5  # predicted end-to-end speedup per image to reach
    images: int = 4  # calibration trajectories (cycling through the labels); more = steadier ranking
    steps: int | None = None  # default: the bundle's own
    sampler: str | None = None
    guidance: float | None = None
    seed: int = 1234  # calibration noise; a seed other than generate's default 0, so bench images are unseen
    timing_repeats: int = 7  # interleaved timing rounds of the cost model (medians)

    def __post_init__(self):
        check_options(self)  # floats finite, seeds and counts in range (formats/errors.py)
        if not (isinstance(self.target_speedup, (int, float)) and math.isfinite(self.target_speedup)
                and self.target_speedup > 1.0):
            raise ConfigError(f"--target-speedup must be a number > 1 (got {self.target_speedup})")
        if self.images < 1:
            raise ConfigError(f"--images must be >= 1 (got {self.images})")
        if self.steps is not None and not 2 <= self.steps <= 1000:
            raise ConfigError(f"--steps must be in 2..1000 for caching (got {self.steps})")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            from ditkit.formats.errors import choice_error
            raise choice_error("sampler", self.sampler, SAMPLERS)
        if self.timing_repeats < 1:
            raise ConfigError(f"--timing-repeats must be >= 1 (got {self.timing_repeats})")



@dataclass
class CacheReport:
    family: str
    sampler: str
    steps: int
    guidance: float
    num_blocks: int
    calibration_images: int
    target_speedup: float
    predicted_speedup: float  # from the timed cost model
    flops_speedup: float  # from FlopCounterMode (no per-call overhead: an upper bound)
    skipped_block_steps: int  # sum over steps of skipped blocks
    total_block_steps: int
    latent_rel_error: float  # ||x_cached - x_ref|| / ||x_ref|| of the final latents, calibration set
    image_psnr: float | None  # decoded calibration images vs the uncached ones (dB, mean)
    rounds: list = field(default_factory=list)  # per greedy round: predicted speedup and mean step error
    checks: list = field(default_factory=list)  # per search: predicted and measured (one image, CPU time) speedup
    cost_ms: dict = field(default_factory=dict)  # the timed cost model
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


class _Calib:
    def __init__(self, bundle, cfg: CacheConfig, embeddings=None):
        self.bundle, self.fam, self.tr = bundle, bundle.family, bundle.transformer
        if self.fam.conditioning != "class" and embeddings is None:
            raise ConfigError(f"the {self.fam.name} family is text-conditioned: its calibration runs need prompts; "
                              "pass --embeddings FILE (precomputed prompt embeddings, docs/formats.md)")
        self.sampler, self.steps, self.guidance = settings(
            bundle, GenerateConfig(steps=cfg.steps, sampler=cfg.sampler, guidance=cfg.guidance))
        make_scheduler(self.fam, bundle.scheduler, self.sampler)  # validates the sampler
        if self.steps < 2:
            raise ConfigError(f"caching needs at least 2 steps (the bundle samples with {self.steps})")
        n = padded(cfg.images)
        gcfg = GenerateConfig(num_images=n, steps=self.steps, sampler=self.sampler, guidance=self.guidance)
        values, cond, uncond = conditions(bundle, gcfg, "cpu", embeddings)
        rows = [i % len(values) for i in range(n)]
        self.use_cfg = self.fam.uses_cfg(self.tr, self.guidance)
        if self.use_cfg and uncond is None:
            raise ConfigError(f"guidance {self.guidance} needs unconditional embeddings; the embeddings file has "
                              "none (pass --guidance 1, or an embeddings file with negative_ rows)")
        pick = lambda d: None if d is None else {k: v[rows] for k, v in d.items()}
        self.cond, self.uncond = pick(cond), (pick(uncond) if self.use_cfg else None)
        h, w = latent_hw(bundle, None, None)
        self.noise = image_noise(cfg.seed, list(range(n)), (self.fam.latent_channels(self.tr), h, w))
        self.cache = BlockCache(self.fam, self.tr)
        self.n_blocks = len(self.cache.blocks)

    def sched(self):
        return make_scheduler(self.fam, self.bundle.scheduler, self.sampler)

    def run(self, policy_skip: list, probe=None) -> torch.Tensor:
        """Final latents under `policy_skip`; `probe(step, x, t, cond, full_out)` sees each step's inputs."""
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
            return denoise(fam, tr, self.sched(), self.noise, self.cond, self.uncond, g, self.steps, predict=predict)

    def call_with(self, x, t, cond, skip, record=False):
        """One model call with `skip`, deltas left as they are (unless record)."""
        bc = self.cache
        saved = bc.record
        bc.skip, bc.record = skip, record
        try:
            return self.fam.predict(self.tr, x, t, cond, self.guidance)
        finally:
            bc.record = saved


def _cost_model(c: _Calib, repeats: int) -> dict:
    """Timed ms of one image's full call, its all-blocks-skipped call (same inputs) and the decode call that
    a batch of one image makes."""
    captured = {}

    def probe(i, x, t, cond):
        if i == 1:
            captured.update(x=x, t=t, cond=cond)
    with torch.no_grad():
        ref = c.run([None] * c.steps, probe=probe)
    # one image's rows (cond + uncond with guidance): bench's batch-1 headline, where per-call overhead weighs most
    n = c.noise.shape[0]
    rows = [0, n] if c.use_cfg else [0]
    x, t, cond = captured["x"][rows], captured["t"][rows], {k: v[rows] for k, v in captured["cond"].items()}
    every = (0, c.n_blocks)
    lat = pad_rows(ref[:1], 4)  # the VAE always decodes 4 latents per call (ops.sample.decode)
    with torch.no_grad(), c.cache.hooked():
        c.call_with(x, t, cond, None, record=True)  # deltas of these rows, for the skipped call
        full = lambda: c.call_with(x, t, cond, None)
        skip_all = lambda: c.call_with(x, t, cond, every)
        dec = lambda: decode(c.bundle.vae, lat)
        med = cpu_ms({"full": full, "skip_all": skip_all, "decode": dec}, repeats)
        flops = {k: call_flops(fn) for k, fn in (("full", full), ("skip_all", skip_all), ("decode", dec))}
    return {"full_ms": med["full"], "skip_all_ms": med["skip_all"], "decode_ms": med["decode"],
            "flops_full": flops["full"], "flops_skip_all": flops["skip_all"], "flops_decode": flops["decode"]}


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


def _measured_speedup(c: _Calib, skip: list, repeats: int) -> float:
    first = lambda d: None if d is None else {k: v[:1] for k, v in d.items()}  # noqa: E731
    policy = CachePolicy(sampler=c.sampler, steps=c.steps, num_blocks=c.n_blocks, skip=list(skip))
    return image_speedup(c.bundle, c.noise[:1], first(c.cond), first(c.uncond), c.sampler, c.steps, c.guidance,
                         lambda: cached_predict(c.bundle, policy, c.guidance), repeats)


def _speedup(skip: list, steps: int, n_blocks: int, full: float, skip_all: float, dec: float) -> float:
    blk = max(full - skip_all, 0.0) / n_blocks
    base = steps * full + dec
    saved = sum((r[1] - r[0]) * blk for r in skip if r is not None)
    return base / max(base - saved, 1e-9)


@torch.no_grad()
def cache(bundle, cfg: CacheConfig, embeddings=None) -> tuple[object, CacheReport]:
    """Calibrate a caching policy for `bundle` (text families: on `embeddings`, (prompts, cond, uncond) as
    formats.embeddings.load_embeddings returns them); returns the bundle (weights untouched, policy in
    bundle.manifest["cache"]) and the report."""
    from ditkit.ops.feedback import refuse

    refuse(bundle, "ditkit cache", "this bundle has a feedback module (distill --mode feedback); feedback and step "
                                   "caching do not stack: cache the model it was distilled from instead")
    t_start = time.perf_counter()
    c = _Calib(bundle, cfg, embeddings)
    S, L = c.steps, c.n_blocks
    cost = _cost_model(c, cfg.timing_repeats)
    spd = lambda skip: _speedup(skip, S, L, cost["full_ms"], cost["skip_all_ms"], cost["decode_ms"])
    fspd = lambda skip: _speedup(skip, S, L, cost["flops_full"], cost["flops_skip_all"], cost["flops_decode"])
    best = spd([None] + [(0, L)] * (S - 1))
    if best < cfg.target_speedup:
        raise ConfigError(f"--target-speedup {cfg.target_speedup} is out of reach for this model: skipping every "
                          f"block at every step but the first would give {best:.2f}x (the rest is decode and "
                          f"per-step overhead); choose a lower target")
    ranges = _ranges(L)
    skip: list = [None] * S
    ref = c.run(skip)
    rounds, checks, goal = [], [], cfg.target_speedup
    for attempt in range(MEASURE_ATTEMPTS):
        _greedy(c, skip, goal, spd, ranges, rounds)
        if spd(skip) < goal:
            break
        # 4. the policy end to end, against the uncached run (what bench measures): the cost model misses
        # whatever a skipped step still costs, so a short measurement raises the goal and the search goes on
        measured = _measured_speedup(c, skip, cfg.timing_repeats)
        checks.append({"predicted_speedup": round(spd(skip), 4), "measured_speedup": round(measured, 4)})
        if measured >= cfg.target_speedup:
            break
        goal = spd(skip) * cfg.target_speedup / measured
    if not checks or checks[-1]["measured_speedup"] < cfg.target_speedup:
        got = f"{checks[-1]['measured_speedup']:.2f}x measured" if checks else f"{spd(skip):.2f}x predicted"
        raise ConfigError(f"calibration reached only {got} of --target-speedup {cfg.target_speedup}; "
                          "choose a lower target")
    policy = CachePolicy(sampler=c.sampler, steps=S, num_blocks=L, skip=skip)
    # 3. the chosen policy against the uncached run
    out = c.run(skip)
    psnr_db = None
    if bundle.vae is not None:
        from ..metrics import psnr

        a, b = decode(bundle.vae, out), decode(bundle.vae, ref)
        psnr_db = round(float(np.mean([psnr(x, y) for x, y in zip(a, b)])), 3)
    bundle.manifest = {**(bundle.manifest or {}), "cache": policy.to_dict()}
    report = CacheReport(
        family=bundle.family.name, sampler=c.sampler, steps=S, guidance=c.guidance, num_blocks=L,
        calibration_images=c.noise.shape[0], target_speedup=cfg.target_speedup,
        predicted_speedup=round(spd(skip), 4), flops_speedup=round(fspd(skip), 4),
        skipped_block_steps=policy.skipped_blocks(), total_block_steps=S * L,
        latent_rel_error=round(_rel(out, ref), 6), image_psnr=psnr_db, rounds=rounds, checks=checks,
        cost_ms={k: (round(v, 4) if k.endswith("_ms") else v) for k, v in cost.items()},
        policy=policy.to_dict(), seconds=round(time.perf_counter() - t_start, 2))
    return bundle, report
