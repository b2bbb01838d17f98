"""feedback: Inner Loop Feedback (ILF, arXiv 2501.13107), the same step count made cheaper by a trained module.

What runs at sampling time is ops/feedback.py: at a partial step, blocks 0..j are not run; their output is
predicted from the previous step's by the cached deviation plus s * (F(.) - .), F a copy of block j (all its
settings and, at the start, its weights), s a scalar gate initialized at zero. Here:

  1. the pool: `pool_size` seeded trajectories of the model's own sampler, steps and guidance (its labels or
     the given prompts); at every step and for every row of the call (conditional and unconditional branch)
     the latents, g (the hidden states entering block 0), H (block j's output) and the model output are kept;
  2. the schedule (no hand constants): a cost model timed like ditkit cache's (one image's full call and
     partial call, and the decode, in process CPU time on one thread) gives the fewest partial steps that
     reach `target_speedup`; which steps are partial is ranked by the measured error of the untrained partial
     step (s = 0: the plain cached deviation) against the full call on the pool, lowest first, never step 0
     and never more than MAX_CHAIN partial steps in a row; the schedule is then timed end to end on one image
     and a measured shortfall raises the goal (MEASURE_ATTEMPTS choices at most);
  3. training: only F and s train (the backbone is frozen and never copied: the output bundle holds the very
     same tensors). A row is (trajectory, partial step i, branch): the partial call is made from the true
     g and H of step i-1 on step i's latents, and its loss is the relative squared error of the model output
     (output_weight) plus that of the predicted block-j features (feature_weight) against the full call.
Data: the model's own trajectories (labels, or prompt embeddings for text families); no images.
"""
from __future__ import annotations

import torch

from ditkit.formats.errors import ConfigError, UnsupportedModelError
from ditkit.ops.feedback import (Feedback, FeedbackModule, FeedbackRunner, FeedbackSchedule, backbone_blocks,
                                 feedback_predict)
from ditkit.ops.generate import GenerateConfig
from ditkit.ops.geometry import settings
from ditkit.ops.runtime import image_speedup
from ditkit.ops.timing import cpu_ms
from ditkit.ops.sample import decode, denoise, make_scheduler, pad_rows

from .common import conditions, local_rows, native_hw, pool_noise, reduce_rows, to_device

DEFAULT_TARGET = 1.7  # without --target-speedup: this, or the most MAX_CHAIN allows (ILF reports 1.7-1.8x)
MAX_CHAIN = 3  # partial steps in a row at most (each chains the previous prediction)
ERROR_TRAJECTORIES = 16  # pool trajectories the schedule's per-step errors are measured on
TIMING_REPEATS = 21
MEASURE_ATTEMPTS = 3  # schedule choices, each checked end to end; a short one raises the cost model's goal


class Pool:
    """Per trajectory p, step i and branch r: latents X[p, i], hidden states G/H[p, i, r], outputs O[p, i, r];
    for two-stream blocks also the text stream GE/JE[p, i, r] (ops.feedback.FeedbackRunner's ge/je)."""

    def __init__(self, x, t, g, h, o, conds, branches: int, ge=None, je=None):
        self.x, self.t, self.g, self.h, self.o, self.ge, self.je = x, t, g, h, o, ge, je
        self.conds, self.branches = conds, branches

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in (self.x, self.g, self.h, self.o, self.ge, self.je)
                   if v is not None)

    def set_state(self, runner, p, i, branch, device, dtype) -> None:
        """The runner's state as step i-1's full call left it, for rows (trajectory p, branch)."""
        runner.g = self.g[p, i - 1, branch].to(device, dtype)
        runner.h = self.h[p, i - 1, branch].to(device, dtype)
        if self.je is not None:
            runner.ge = self.ge[p, i - 1, branch].to(device, dtype)
            runner.je = self.je[p, i - 1, branch].to(device, dtype)

    def rows(self, p: torch.Tensor, branch: torch.Tensor, device, dtype) -> dict:
        """Conditioning of rows (trajectory p, branch): the conditional or the unconditional one, in row order."""
        c, u = self.conds.rows(p), (self.conds.rows(p, uncond=True) if self.branches > 1 else None)
        if u is None:
            return to_device(c, device, dtype)
        m = branch.bool()
        out = {}
        for k in c:
            v = c[k].clone()
            v[m] = u[k][m]
            out[k] = v
        return to_device(out, device, dtype)


@torch.no_grad()
def build_pool(bundle, j: int, n: int, seed: int, sampler: str, steps: int, guidance: float, device, embeddings=None,
               batch: int = 64, progress=None) -> Pool:
    fam, tr = bundle.family, bundle.transformer
    conds = conditions(bundle, n, seed, embeddings)
    use_cfg = conds.uncond is not None and fam.uses_cfg(tr, guidance)
    R = 2 if use_cfg else 1
    noise = pool_noise(seed, n, (fam.latent_channels(tr), *native_hw(bundle)))
    p0 = next(tr.parameters())
    runner = FeedbackRunner(fam, tr, j, feedback=None)
    xs, gs, hs, os_, ges, jes, ts = [], [], [], [], [], [], []
    for start in range(0, n, batch):
        idx = torch.arange(start, min(n, start + batch))
        b = len(idx)
        cond = to_device(conds.rows(idx), device, p0.dtype)
        uncond = to_device(conds.rows(idx, uncond=True), device, p0.dtype) if use_cfg else None
        rec = {"x": [], "g": [], "h": [], "o": [], "t": [], "ge": [], "je": []}

        def predict(x, t, c):
            runner.partial = False
            out = fam.predict(tr, x, t, c, guidance)
            # rows are [cond batch; uncond batch]: regroup as (b, R, ...)
            regroup = lambda v: v.reshape(R, b, *v.shape[1:]).transpose(0, 1).float().cpu()  # noqa: E731
            rec["x"].append(x[:b].float().cpu())
            rec["g"].append(regroup(runner.g))
            rec["h"].append(regroup(runner.h))
            rec["o"].append(regroup(out))
            rec["t"].append(float(t[0]))
            if runner.je is not None:  # two-stream blocks: the text stream too
                rec["ge"].append(regroup(runner.ge))
                rec["je"].append(regroup(runner.je))
            return out

        with runner.hooked():
            denoise(fam, tr, make_scheduler(fam, bundle.scheduler, sampler), noise[idx].to(device), cond, uncond,
                    guidance, steps, predict=predict)
        xs.append(torch.stack(rec["x"], 1))
        gs.append(torch.stack(rec["g"], 1))
        hs.append(torch.stack(rec["h"], 1))
        os_.append(torch.stack(rec["o"], 1))
        if rec["je"]:
            ges.append(torch.stack(rec["ge"], 1))
            jes.append(torch.stack(rec["je"], 1))
        ts = rec["t"]
        if progress is not None:
            progress(b)
    two = bool(jes)
    return Pool(torch.cat(xs), torch.tensor(ts), torch.cat(gs), torch.cat(hs), torch.cat(os_), conds, R,
                ge=torch.cat(ges) if two else None, je=torch.cat(jes) if two else None)


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row relative squared error."""
    return ((a - b) ** 2).flatten(1).mean(1) / (b ** 2).flatten(1).mean(1).clamp_min(1e-12)


def partial_call(fam, tr, runner: FeedbackRunner, pool: Pool, p, i, branch, guidance, device, dtype):
    """The model output of the partial call of rows (trajectory p, step i, branch) from the true state of step
    i-1 (i an int or a tensor per row); the runner is left holding the predicted block-j state."""
    x = pool.x[p, i].to(device, dtype)
    t = pool.t[i].expand(len(p)).to(device)
    pool.set_state(runner, p, i, branch, device, dtype)
    runner.partial = True
    with runner.hooked():
        return fam.predict(tr, x, t, pool.rows(p, branch, device, dtype), guidance).float()


@torch.no_grad()
def step_errors(fam, tr, runner, pool: Pool, guidance, device, dtype) -> list[float]:
    """Mean relative error of the untrained partial call (gate 0) at every step, against the full call."""
    n = min(ERROR_TRAJECTORIES, pool.x.shape[0])
    errs = [0.0]
    for i in range(1, pool.x.shape[1]):
        p = torch.arange(n).repeat_interleave(pool.branches)
        branch = torch.arange(pool.branches).repeat(n)
        out = partial_call(fam, tr, runner, pool, p, i, branch, guidance, device, dtype)
        errs.append(float(_rel(out, pool.o[p, i, branch].to(device)).mean()))
    return errs


@torch.no_grad()
def cost_model(bundle, runner: FeedbackRunner, pool: Pool, sampler: str, guidance, device) -> dict:
    """ms of one image's full call and partial call (all its branches), of the rest of one sampler step
    (scheduler update, guidance arithmetic, Python: a whole uncached run minus its calls, per step) and of its
    decode (4 latents per call, ops.sample.decode)."""
    fam, tr = bundle.family, bundle.transformer
    dtype = next(tr.parameters()).dtype
    p = torch.zeros(pool.branches, dtype=torch.long)
    branch = torch.arange(pool.branches)
    steps = pool.x.shape[1]
    i = steps // 2
    x, t = pool.x[p, i].to(device, dtype), pool.t[i].expand(len(p)).to(device)
    cond = pool.rows(p, branch, device, dtype)

    def call(partial: bool):
        pool.set_state(runner, p, i, branch, device, dtype)
        runner.partial = partial
        with runner.hooked():
            fam.predict(tr, x, t, cond, guidance)
    c, u = pool.conds.rows(p[:1]), (pool.conds.rows(p[:1], uncond=True) if pool.branches > 1 else None)
    c, u = to_device(c, device, dtype), to_device(u, device, dtype)
    noise = pool.x[:1, 0].to(device)
    run = lambda: denoise(fam, tr, make_scheduler(fam, bundle.scheduler, sampler), noise, c, u, guidance,  # noqa: E731
                          steps)
    lat = pad_rows(pool.x[:1, -1].to(device), 4)
    calls = {"full": lambda: call(False), "partial": lambda: call(True), "run": run}
    if bundle.vae is not None:
        calls["decode"] = lambda: decode(bundle.vae, lat)
    med = cpu_ms(calls, TIMING_REPEATS)
    step_ms = max(med["run"] / steps - med["full"], 0.0)
    return {"full_ms": round(med["full"], 4), "partial_ms": round(med["partial"], 4),
            "step_overhead_ms": round(step_ms, 4), "decode_ms": round(med.get("decode", 0.0), 4)}


def predicted_speedup(partial: list, cost: dict) -> float:
    per_step = len(partial) * cost["step_overhead_ms"] + cost["decode_ms"]
    base = len(partial) * cost["full_ms"] + per_step
    now = sum(cost["partial_ms"] if p else cost["full_ms"] for p in partial) + per_step
    return base / max(now, 1e-9)


def choose_schedule(errors: list[float], cost: dict, target: float | None, strict: bool | None = None) -> list[bool]:
    """Fewest partial steps reaching `target`, lowest measured error first, at most MAX_CHAIN in a row.
    target None: DEFAULT_TARGET. Not strict (the default without a target): as close as the chain limit allows;
    strict: an error when out of reach."""
    strict = target is not None if strict is None else strict
    target = DEFAULT_TARGET if target is None else target
    steps = len(errors)
    partial = [False] * steps
    if cost["partial_ms"] >= cost["full_ms"]:
        return partial  # a partial call is no cheaper than a full one on this model

    def chain_ok(i):
        trial = partial[:i] + [True] + partial[i + 1:]
        run = 0
        for v in trial:
            run = run + 1 if v else 0
            if run > MAX_CHAIN:
                return False
        return True
    for i in sorted(range(1, steps), key=lambda k: (errors[k], k)):
        if predicted_speedup(partial, cost) >= target:
            break
        if chain_ok(i):
            partial[i] = True
    if predicted_speedup(partial, cost) < target and strict:
        best = predicted_speedup(partial, cost)
        raise ConfigError(f"--target-speedup {target} is out of reach: with at most {MAX_CHAIN} partial steps in a "
                          f"row the cost model predicts {best:.2f}x (full call {cost['full_ms']:.2f} ms, partial "
                          f"{cost['partial_ms']:.2f} ms, decode {cost['decode_ms']:.2f} ms); choose a lower "
                          "--target-speedup")
    return partial


def measured_speedup(bundle, module, pool: Pool, partial: list, sampler: str, j: int, guidance, device) -> float:
    """ops.runtime.image_speedup of the schedule on the pool's first trajectory. The gate does not change the
    cost, so the untrained module times the trained one."""
    fam, tr = bundle.family, bundle.transformer
    dtype = next(tr.parameters()).dtype
    p = torch.zeros(1, dtype=torch.long)
    c = to_device(pool.conds.rows(p), device, dtype)
    u = to_device(pool.conds.rows(p, uncond=True), device, dtype) if pool.branches > 1 else None
    fb = Feedback(module, FeedbackSchedule(sampler=sampler, steps=len(partial), num_blocks=len(fam.blocks(tr)),
                                           block=j, partial=list(partial)))
    return image_speedup(bundle, pool.x[:1, 0].to(device), c, u, sampler, len(partial), guidance,
                         lambda: feedback_predict(bundle, fb, guidance), TIMING_REPEATS // 3)


def calibrated_schedule(bundle, module, pool, errors, cost, target, sampler, j, guidance, device):
    """choose_schedule, then an end-to-end check: a measured speedup short of the target raises the cost model's
    goal and the choice is made again (MEASURE_ATTEMPTS at most). Returns (partial, checks)."""
    want = DEFAULT_TARGET if target is None else target
    partial = choose_schedule(errors, cost, target)  # an explicit target out of the cost model's reach: an error
    checks = []
    for attempt in range(MEASURE_ATTEMPTS):
        measured = measured_speedup(bundle, module, pool, partial, sampler, j, guidance, device)
        checks.append({"predicted_speedup": round(predicted_speedup(partial, cost), 4),
                       "measured_speedup": round(measured, 4)})
        if measured >= want or attempt == MEASURE_ATTEMPTS - 1:
            break
        more = choose_schedule(errors, cost, predicted_speedup(partial, cost) * want / measured, strict=False)
        if more == partial:
            break  # as many partial steps as the chain limit allows
        partial = more
    if target is not None and checks[-1]["measured_speedup"] < target:
        raise ConfigError(f"--target-speedup {target} is out of reach: the schedule measured "
                          f"{checks[-1]['measured_speedup']:.2f}x end to end; choose a lower target")
    return partial, checks


def prepare(ctx):
    from ditkit.formats import quantized
    from ditkit.formats.feedback import fingerprint

    from .common import Job

    cfg, bundle = ctx.cfg, ctx.student
    fam, tr = bundle.family, bundle.transformer
    if ctx.teacher is not ctx.student:
        raise ConfigError("--mode feedback trains a feedback module against the model's own full steps; drop --teacher")
    if quantized.is_quantized(tr):
        raise UnsupportedModelError("--mode feedback needs a floating-point backbone (its block is copied and "
                                    "trained); run it before ditkit quantize")
    if getattr(bundle, "feedback", None) is not None:
        raise ConfigError(f"{bundle.name} already has a feedback module; distill from its parent instead")
    if (bundle.manifest or {}).get("cache"):
        raise ConfigError(f"{bundle.name} carries a ditkit cache policy; feedback and caching do not stack: "
                          "distill --mode feedback on the model without it")
    blocks = backbone_blocks(fam, tr)
    L = len(blocks)
    j = L - 1 if cfg.feedback_block is None else cfg.feedback_block
    if not 0 <= j < L:
        raise ConfigError(f"--feedback-block must be in 0..{L - 1} for this {L}-block model (got {j})")
    sampler, steps, guidance = settings(bundle, GenerateConfig())
    if steps < 2:
        raise ConfigError(f"feedback needs at least 2 sampling steps (the model samples with {steps})")
    device, dtype = ctx.device, next(tr.parameters()).dtype
    module = FeedbackModule(blocks[j], f"{fam.blocks_attr}.{j}").to(device).float().requires_grad_(True)

    ctx.log(f"pool: {cfg.pool_size} trajectories of the model's own sampler ({sampler}, {steps} steps, guidance "
            f"{guidance}); block 0 inputs and block {j} outputs kept at every step")
    pool = build_pool(bundle, j, cfg.pool_size, cfg.seed, sampler, steps, guidance, device, ctx.embeddings,
                      progress=ctx.pool_progress)
    runner = FeedbackRunner(fam, tr, j, module)
    errors = step_errors(fam, tr, runner, pool, guidance, device, dtype)
    stored = ctx.store.logged_plan() if ctx.resume and ctx.store is not None else None
    if stored and "schedule" in stored:  # --resume: the schedule the run was timed and started with
        schedule, cost = FeedbackSchedule.from_dict(stored["schedule"]), stored.get("cost_ms") or {}
        if (schedule.sampler, schedule.steps, schedule.num_blocks, schedule.block) != (sampler, steps, L, j):
            raise ConfigError("--resume: the checkpoint's feedback schedule is for another model or block; start "
                              "over with --force")
        partial = schedule.partial
    else:
        cost = cost_model(bundle, runner, pool, sampler, guidance, device)
        partial, cost["checks"] = calibrated_schedule(bundle, module, pool, errors, cost, cfg.target_speedup, sampler,
                                                      j, guidance, device)
        schedule = FeedbackSchedule(sampler=sampler, steps=steps, num_blocks=L, block=j, partial=partial)
        ctx.log(f"cost model (CPU ms, one image): full call {cost['full_ms']:.2f}, partial {cost['partial_ms']:.2f}, "
                f"rest of a step {cost['step_overhead_ms']:.2f}, decode {cost['decode_ms']:.2f}")
    speedup = predicted_speedup(partial, cost) if cost else None
    part = [i for i, v in enumerate(partial) if v]
    if not part:
        raise ConfigError(f"no step can be made partial on this model: the feedback block costs as much as it saves "
                          f"(full call {cost.get('full_ms')} ms, partial {cost.get('partial_ms')} ms)")
    ctx.log(f"schedule: {len(part)} of {steps} steps partial ({''.join('p' if v else 'F' for v in partial)}), "
            f"predicted {speedup:.2f}x")

    R = pool.branches
    n_rows = cfg.pool_size * len(part) * R
    part_t = torch.tensor(part)

    def loss_fn(model, g, rank, world):
        micro = ctx.micro_batch
        idx = local_rows(micro, g, n_rows, rank, world)
        p, rest = idx // (len(part) * R), idx % (len(part) * R)
        i, branch = part_t[rest // R], rest % R
        train_runner = FeedbackRunner(fam, tr, j, model)
        out = partial_call(fam, tr, train_runner, pool, p, i, branch, guidance, device, dtype)
        per_row = cfg.output_weight * _rel(out, pool.o[p, i, branch].to(device))
        if cfg.feature_weight:
            per_row = per_row + cfg.feature_weight * _rel(train_runner.h.float(), pool.h[p, i, branch].to(device))
            if pool.je is not None:  # the text stream the blocks after j read (flux's single-stream blocks)
                per_row = per_row + cfg.feature_weight * _rel(train_runner.je.float(), pool.je[p, i, branch].to(device))
        return reduce_rows(per_row, micro, world)

    trained = sum(p.numel() for p in module.parameters())
    backbone = sum(p.numel() for p in tr.parameters())
    plan = {"trains": f"the feedback module only: a copy of {module.source} and its gate ({trained:,} parameters, "
                      f"{100 * trained / backbone:.1f}% of the frozen {backbone:,}-parameter backbone)",
            "data": f"data-free: {cfg.pool_size} trajectories of the model's own sampler on {pool.conds.kind}",
            "student": f"{steps} {sampler} steps, {len(part)} of them partial (blocks 0..{j} replaced by the "
                       f"feedback block), predicted {speedup:.2f}x per image",
            "schedule": schedule.to_dict(), "cost_ms": cost}
    report = {"feedback_block": j, "source": module.source, "schedule": schedule.to_dict(),
              "cost_ms": cost, "predicted_speedup": round(speedup, 4),
              "step_errors_untrained": [round(e, 6) for e in errors],
              "pool": {"trajectories": cfg.pool_size, "rows": n_rows, "conditions": pool.conds.kind,
                       "branches": R, "text_stream": pool.je is not None, "bytes": pool.nbytes()},
              "params_backbone": backbone}
    return Job(model=module, loss_fn=loss_fn, defaults=bundle.defaults(), scheduler=None, plan=plan, report=report,
               rows_per_step=ctx.micro_batch, data_bytes=pool.nbytes(), transformer=tr,
               feedback=Feedback(module, schedule, fingerprint(tr)))
