"""steps: a few-step student with classifier-free guidance folded in (progressive distillation in one stage).

Progressive distillation (Salimans & Ho 2022) teaches a student one sampler step that lands where two teacher
steps land, and halves the step count stage after stage; with guidance folded in (Meng et al. 2023) the
student's single call reproduces the teacher's guided pair of calls. Here the halvings are collapsed into one
stage (as TRACT does with its large jumps), which works without data because the targets are exact:

  1. the student's grid is what its own sampler will use at K steps: DDIM with "trailing" spacing for epsilon
     families (dit, pixart: the first step starts at pure noise, the last lands on alpha = 1), the flow Euler
     sampler with the checkpoint's shift for flow families (sd3, flux);
  2. the teacher samples a seeded pool of trajectories from noise with classifier-free guidance at its default
     scale, taking `teacher_substeps` first-order steps (DDIM / Euler) inside every student interval, and the
     state at each of the K+1 grid points is kept;
  3. a training row is (trajectory, grid step i): the student, called once without guidance at the grid point,
     must produce the output whose sampler step lands on the teacher's state at point i+1. The sampler update is
     linear in the output (x' = A x + B out), so the loss is the squared distance of the landing points.

The student is a copy of SRC, which is its own teacher by default; with `--teacher BASE` SRC may be a smaller
model of the same family (a depth-pruned BASE: fewer blocks per call as well as fewer calls), which keeps its
own architecture and learns BASE's guided trajectories. It samples at guidance 1 (one call
per step instead of two) in K steps: at 25 -> 4 steps that is 12.5x fewer transformer rows per image. Flux
embeds guidance instead of doubling the batch: its student keeps the teacher's guidance value.
Data: labels (class families) or prompt embeddings (text families) only; no images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ditkit.formats.errors import ConfigError, UnsupportedModelError
from ditkit.ops.sample import DEFAULT_SCHEDULER, _set_timesteps

from .common import Routed, conditions, guided, local_rows, native_hw, pool_noise, reduce_rows, to_device, unwrap

# DDIM for few steps: no clipping (latents are not in [-1, 1]), trailing spacing (start at t = T-1, pure
# noise), the last step to alpha = 1 (a clean sample), no offset
DDIM_STUDENT = {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
                "thresholding": False, "prediction_type": "epsilon"}


@dataclass
class Step:
    """One first-order sampler step: call the model at `t`, then x' = a * x + b * output."""
    t: float
    a: float
    b: float


@dataclass
class Grid:
    student: list[Step]  # K steps, exactly as the student's scheduler takes them
    teacher: list[list[Step]]  # per student interval, the teacher's sub-steps
    sampler: str
    init_sigma: float = 1.0

    def describe(self) -> dict:
        return {"student_timesteps": [round(s.t, 3) for s in self.student],
                "teacher_steps": sum(len(sub) for sub in self.teacher), "sampler": self.sampler}


# what the student's output means (epsilon families; flow families predict the velocity). At one step the
# epsilon output is ill-conditioned: DDIM's landing point x0 = (x - sqrt(1 - a) eps) / sqrt(a) at t = 999
# (alpha_cumprod 4e-5 on a linear schedule) multiplies the output's error by about 157; v (and x0 itself)
# keep it near 1. "auto": epsilon for K >= 2 (the teacher's own parameterization), AUTO_ONE_STEP for K = 1.
PREDICTIONS = ("auto", "epsilon", "v_prediction", "sample")
AUTO_ONE_STEP = "v_prediction"


def resolve_prediction(family, prediction: str | None, k: int) -> str:
    """The student's output parameterization: 'flow' for flow families, else epsilon / v_prediction / sample."""
    prediction = prediction or "auto"
    if family.prediction == "flow":
        if prediction != "auto":
            raise ConfigError(f"--prediction {prediction} applies to epsilon families (dit, pixart); a "
                              f"{family.name} student predicts the flow velocity")
        return "flow"
    if prediction == "auto":
        return AUTO_ONE_STEP if k == 1 else "epsilon"
    return prediction


def student_scheduler(family, base_scheduler, prediction: str = "epsilon"):
    """The scheduler the student is saved with (its sampler reads it)."""
    import diffusers

    if family.prediction == "flow":
        if base_scheduler is not None and type(base_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
            config = dict(base_scheduler.config)
        else:
            config = dict(DEFAULT_SCHEDULER["flow"][1])
        config["stochastic_sampling"] = False
        config.pop("_use_default_values", None)
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    config = dict(base_scheduler.config) if base_scheduler is not None else dict(DEFAULT_SCHEDULER["epsilon"][1])
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise UnsupportedModelError(f"steps: the teacher's scheduler predicts {config['prediction_type']!r}; "
                                    "only epsilon-prediction teachers are supported for this family")
    config.update(DDIM_STUDENT)
    config["prediction_type"] = "epsilon" if prediction in ("auto", "flow") else prediction
    config.pop("_use_default_values", None)  # else from_config resets the keys it lists (timestep_spacing ...)
    return diffusers.DDIMScheduler.from_config(config)


def _ddim_step(acp, final, t_from: int, t_to: int, prediction: str = "epsilon") -> Step:
    """DDIM (eta 0) from t_from to t_to as x' = a x + b out, for an output that is epsilon, v or x0 ("sample")."""
    a = float(acp[t_from])
    a2 = float(acp[t_to]) if t_to >= 0 else final
    if prediction == "sample":  # eps = (x - sqrt(a) x0) / sqrt(1 - a)
        r = math.sqrt((1 - a2) / (1 - a))
        return Step(t=float(t_from), a=r, b=math.sqrt(a2) - r * math.sqrt(a))
    if prediction == "v_prediction":  # x0 = sqrt(a) x - sqrt(1 - a) v, eps = sqrt(a) v + sqrt(1 - a) x
        return Step(t=float(t_from), a=math.sqrt(a2 * a) + math.sqrt((1 - a2) * (1 - a)),
                    b=math.sqrt((1 - a2) * a) - math.sqrt(a2 * (1 - a)))
    return Step(t=float(t_from), a=math.sqrt(a2 / a), b=math.sqrt(1 - a2) - math.sqrt(a2 * (1 - a) / a))


def make_grid(family, sched, k: int, substeps: int, latent_shape: tuple) -> Grid:
    """The student's K steps (from its scheduler, in its own parameterization) and the teacher's (epsilon)
    sub-steps inside each interval."""
    dummy = torch.zeros(1, *latent_shape)
    _set_timesteps(sched, k, dummy, "cpu")
    if family.prediction == "flow":
        sig = [float(s) for s in sched.sigmas]  # K + 1, the last one 0
        n = sched.config.num_train_timesteps
        student = [Step(t=float(sched.timesteps[i]), a=1.0, b=sig[i + 1] - sig[i]) for i in range(k)]
        teacher = []
        for i in range(k):
            pts = [sig[i] + (sig[i + 1] - sig[i]) * j / substeps for j in range(substeps + 1)]
            teacher.append([Step(t=pts[j] * n, a=1.0, b=pts[j + 1] - pts[j]) for j in range(substeps)])
        return Grid(student, teacher, "flow-euler", float(getattr(sched, "init_noise_sigma", 1.0)))
    acp, final = sched.alphas_cumprod, float(sched.final_alpha_cumprod)
    ts = [int(t) for t in sched.timesteps]
    jump = sched.config.num_train_timesteps // k
    # where each DDIM step lands: the next point's noise level (the state the next call receives)
    points = [ts[0]] + [t - jump for t in ts]
    pred = sched.config.get("prediction_type", "epsilon")
    student = [_ddim_step(acp, final, ts[i], points[i + 1], pred) for i in range(k)]
    teacher = []
    for i in range(k):
        lo, hi = points[i], points[i + 1]
        taus = []
        for j in range(substeps + 1):
            tau = round(lo + (hi - lo) * j / substeps)
            if not taus or tau != taus[-1]:
                taus.append(tau)
        teacher.append([_ddim_step(acp, final, taus[j], taus[j + 1]) for j in range(len(taus) - 1)])
    return Grid(student, teacher, "ddim", float(getattr(sched, "init_noise_sigma", 1.0)))


@dataclass
class Pool:
    states: torch.Tensor  # (P, K+1, C, h, w): the teacher's state at every student grid point
    conds: object  # Conditions, P rows
    guidance: float
    cfg: bool

    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()


@torch.no_grad()
def teacher_pool(teacher_bundle, grid: Grid, n: int, seed: int, guidance: float, device, embeddings=None,
                 batch: int = 128, progress=None) -> Pool:
    fam, tr = teacher_bundle.family, teacher_bundle.transformer
    conds = conditions(teacher_bundle, n, seed, embeddings)
    cfg = conds.uncond is not None and fam.uses_cfg(tr, guidance)
    h, w = native_hw(teacher_bundle)
    noise = pool_noise(seed, n, (fam.latent_channels(tr), h, w))
    p = next(tr.parameters())
    out = []
    for start in range(0, n, batch):
        idx = torch.arange(start, min(n, start + batch))
        cond = to_device(conds.rows(idx), device, p.dtype)
        uncond = to_device(conds.rows(idx, uncond=True), device, p.dtype) if cfg else None
        x = noise[idx].to(device).float() * grid.init_sigma
        states = [x.cpu()]
        for sub in grid.teacher:
            for s in sub:
                t = torch.full((len(idx),), s.t, device=device)
                e = guided(fam, tr, x.to(p.dtype), t, cond, uncond, guidance)
                x = s.a * x + s.b * e
            states.append(x.cpu())
        out.append(torch.stack(states, 1))
        if progress is not None:
            progress(len(idx))
    return Pool(torch.cat(out), conds, guidance, cfg)


def prepare(ctx):
    from .common import Job

    cfg, fam = ctx.cfg, ctx.student.family
    teacher_bundle, student = ctx.teacher, ctx.trainable
    k = cfg.student_steps
    t_defaults = teacher_bundle.defaults()
    guidance = float(t_defaults["guidance"] if cfg.guidance is None else cfg.guidance)
    substeps = cfg.teacher_substeps or max(1, math.ceil(int(t_defaults["steps"]) / k))
    if fam.prediction == "epsilon":
        n_train = (teacher_bundle.scheduler.config.num_train_timesteps if teacher_bundle.scheduler is not None
                   else 1000)
        if k > n_train // 2:
            raise ConfigError(f"--student-steps {k} is too many for a {n_train}-timestep schedule")
        substeps = min(substeps, n_train // k)
    prediction = resolve_prediction(fam, cfg.prediction, k)
    sched = student_scheduler(fam, teacher_bundle.scheduler, prediction)
    h, w = native_hw(teacher_bundle)
    grid = make_grid(fam, sched, k, substeps, (fam.latent_channels(ctx.teacher.transformer), h, w))
    ctx.log(f"pool: the teacher samples {cfg.pool_size} trajectories, {grid.describe()['teacher_steps']} guided steps "
            f"each (guidance {guidance}), kept at the student's {k} grid points")
    pool = teacher_pool(teacher_bundle, grid, cfg.pool_size, cfg.seed, guidance, ctx.device, ctx.embeddings,
                        progress=ctx.pool_progress)
    # guidance folded in: the student answers with one unguided call; flux embeds guidance, so it keeps it
    student_guidance = 1.0 if pool.cfg else guidance
    dtype = next(student.parameters()).dtype
    device = ctx.device
    coef_a = torch.tensor([s.a for s in grid.student])
    coef_b = torch.tensor([s.b for s in grid.student])
    t_model = torch.tensor([s.t for s in grid.student])

    def loss_fn(model, g, rank, world):
        unwrap(model).eval()  # no label dropout: the student answers exactly what it is asked
        micro = ctx.micro_batch
        idx = local_rows(micro, g, cfg.pool_size * k, rank, world)
        traj, i = idx // k, idx % k
        x = pool.states[traj, i].to(device)
        target = pool.states[traj, i + 1].to(device)
        cond = to_device(pool.conds.rows(traj), device, dtype)
        out = fam.predict(Routed(model, student), x.to(dtype), t_model[i].to(device), cond, student_guidance).float()
        landed = coef_a[i].view(-1, 1, 1, 1).to(device) * x + coef_b[i].view(-1, 1, 1, 1).to(device) * out
        per_row = ((landed - target) ** 2).flatten(1).mean(1)
        return reduce_rows(per_row, micro, world)

    defaults = {**ctx.student.defaults(), "sampler": grid.sampler, "steps": k, "guidance": student_guidance}
    n_params = sum(p.numel() for p in student.parameters())
    whose = "the teacher" if ctx.teacher is ctx.student else f"{ctx.student.name} (taught by {ctx.teacher.name})"
    plan = {"trains": f"all {n_params:,} parameters of a copy of {whose}",
            "data": (f"data-free: {cfg.pool_size} teacher trajectories ({grid.describe()['teacher_steps']} guided "
                     f"steps, guidance {guidance}) on {pool.conds.kind}"),
            "student": f"{k} {grid.sampler} steps ({prediction} output) at guidance {student_guidance} "
                       f"({'no classifier-free doubling' if pool.cfg else 'same calls per step'})"}
    report = {"pool": {"trajectories": cfg.pool_size, "points": cfg.pool_size * k, "conditions": pool.conds.kind,
                       "guidance": guidance, "cfg": pool.cfg, "bytes": pool.nbytes()},
              "grid": grid.describe(), "prediction": prediction, "teacher_substeps": substeps, "teacher_guidance": guidance,
              "student_guidance": student_guidance,
              "scheduler": {"class": type(sched).__name__,
                            **{k2: sched.config.get(k2) for k2 in DDIM_STUDENT if k2 in sched.config}}}
    return Job(model=student, loss_fn=loss_fn, defaults=defaults, scheduler=sched, plan=plan, report=report,
               rows_per_step=ctx.micro_batch, data_bytes=pool.nbytes())
