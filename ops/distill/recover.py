"""recover: win back what pruning lost, by knowledge distillation from the teacher (BK-SDM, TinyFusion).

Loss per row (each row is one transformer call of the sampler: the conditional and, with guidance, the
unconditional branch at the same noisy latent):
  1. output matching: MSE between the student's and the teacher's prediction (epsilon or velocity);
  2. block-feature matching: every student block is paired with a teacher block and their outputs are matched
     (relative MSE per token). A depth-pruned student's manifest records which teacher blocks it kept; student
     block j then matches the teacher's stream where its segment ends (just before the next kept block, or the
     teacher's last block), because it has to stand in for the removed blocks after it. Without that record the
     blocks are mapped evenly. Blocks whose widths differ (width pruning) are not matched;
  3. optional outlier masking (TinyFusion's masked KD): per row, the given fraction of tokens with the largest
     feature error is dropped from the feature loss (massive activations would otherwise dominate it);
  4. optional ground truth: the usual denoising loss on an image folder, encoded once through the VAE.

Data-free by default: the inputs are noisy latents along the teacher's own sampling trajectories (its sampler,
steps and guidance, on the model's labels or the given prompts), precomputed once from seeded noise; each step
draws its batch of (trajectory, step) pairs from that pool with the step's generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ditkit.formats.errors import ConfigError
from ditkit.ops.sample import denoise, make_scheduler

from .common import (Conditions, Routed, conditions, local_rows, native_hw, pool_noise, reduce_rows, to_device,
                     unwrap)

GT_NULL_PROB = 0.1  # ground-truth rows trained on the unconditional branch (keeps guidance working)


# -- block mapping -------------------------------------------------------------------------------------------

def _stacks(family):
    return family.stacks


def block_map(student_bundle, teacher_tr: nn.Module) -> tuple[list[tuple[str, str]], str]:
    """[(student block, teacher block)] and where the mapping came from."""
    fam, student_tr = student_bundle.family, student_bundle.transformer
    manifest = student_bundle.manifest or {}
    plan = (manifest.get("report") or {}).get("plan") or {}
    kept = plan.get("kept_blocks") if manifest.get("op") == "prune" else None
    pairs, source = [], "prune plan (kept teacher blocks; each student block matches the end of its segment)"
    for s in _stacks(fam):
        n_s, n_t = len(getattr(student_tr, s.attr)), len(getattr(teacher_tr, s.attr))
        k = sorted(int(name.rsplit(".", 1)[1]) for name in (kept or []) if name.rsplit(".", 1)[0] == s.attr)
        if kept is not None and len(k) == n_s and all(i < n_t for i in k):
            ends = [k[j + 1] - 1 for j in range(n_s - 1)] + [n_t - 1]
        else:
            source = "even (no record of kept blocks): student block j matches teacher block (j+1)*T/S - 1"
            ends = [max(0, round((j + 1) * n_t / n_s) - 1) for j in range(n_s)]
        pairs += [(f"{s.attr}.{j}", f"{s.attr}.{e}") for j, e in enumerate(ends)]
    return pairs, source


class Capture:
    """Forward hooks that keep the outputs of some blocks (as lists of tensors) for the current call."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.names, self.out = names, {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def fn(module, args, output):
            items = output if isinstance(output, (tuple, list)) else (output,)
            self.out[name] = [o for o in items if isinstance(o, torch.Tensor)]
        return fn

    def take(self, name) -> list[torch.Tensor]:
        return self.out.pop(name)

    def close(self):
        for h in self.handles:
            h.remove()


def feature_error(s: torch.Tensor, t: torch.Tensor, mask_fraction: float) -> torch.Tensor:
    """(B,) relative MSE of block outputs (B, ..., D) per row, the `mask_fraction` worst tokens dropped."""
    b, d = s.shape[0], s.shape[-1]
    s, t = s.reshape(b, -1, d).float(), t.reshape(b, -1, d).float()
    err = ((s - t) ** 2).mean(-1)  # (B, T)
    drop = int(mask_fraction * err.shape[1])
    if drop > 0:
        cut = err.detach().topk(drop, dim=1).values[:, -1:]  # the smallest error still dropped
        keep = (err.detach() < cut).float()
    else:
        keep = torch.ones_like(err)
    scale = (t ** 2).mean((1, 2)).clamp_min(1e-8)  # (B,)
    return (err * keep).sum(1) / keep.sum(1).clamp_min(1) / scale


# -- the pool ----------------------------------------------------------------------------------------------

@dataclass
class Pool:
    states: torch.Tensor  # (P, S, C, h, w): the transformer's input at each sampler step
    timesteps: torch.Tensor  # (S,)
    conds: Conditions  # P rows
    sampler: str
    steps: int
    guidance: float
    cfg: bool

    @property
    def size(self) -> int:
        return self.states.shape[0] * self.states.shape[1]

    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()

    def describe(self) -> dict:
        return {"trajectories": int(self.states.shape[0]), "points": self.size, "sampler": self.sampler,
                "steps": self.steps, "guidance": self.guidance, "cfg": self.cfg, "conditions": self.conds.kind,
                "bytes": self.nbytes()}


@torch.no_grad()
def trajectory_pool(teacher_bundle, n: int, seed: int, device, embeddings=None, batch: int = 64,
                    progress=None) -> Pool:
    """The teacher samples `n` images at its default settings; every step's input latent is kept."""
    fam, tr = teacher_bundle.family, teacher_bundle.transformer
    d = teacher_bundle.defaults()
    sampler, steps, guidance = d["sampler"], int(d["steps"]), float(d["guidance"])
    conds = conditions(teacher_bundle, n, seed, embeddings)
    cfg = conds.uncond is not None and fam.uses_cfg(tr, guidance)
    h, w = native_hw(teacher_bundle)
    noise = pool_noise(seed, n, (fam.latent_channels(tr), h, w))
    p = next(tr.parameters())
    states, times = [], None
    for start in range(0, n, batch):
        idx = torch.arange(start, min(n, start + batch))
        rec, ts = [], []

        def record(x, t, c):
            rec.append(x[:len(idx)].float().cpu())
            ts.append(float(t[0]))
            return fam.predict(tr, x, t, c, guidance)

        cond = to_device(conds.rows(idx), device, p.dtype)
        uncond = to_device(conds.rows(idx, uncond=True), device, p.dtype) if cfg else None
        denoise(fam, tr, make_scheduler(fam, teacher_bundle.scheduler, sampler), noise[idx].to(device), cond,
                uncond, guidance, steps, predict=record)
        states.append(torch.stack(rec, 1))  # (b, S, C, h, w)
        times = torch.tensor(ts)
        if progress is not None:
            progress(len(idx))
    return Pool(torch.cat(states), times, conds, sampler, steps, guidance, cfg)


@dataclass
class Truth:
    """Ground-truth latents (encoded once) and their conditions."""
    latents: torch.Tensor  # (N, C, h, w)
    conds: Conditions

    def nbytes(self) -> int:
        return self.latents.numel() * self.latents.element_size()


@torch.no_grad()
def encode_images(bundle, images: torch.Tensor, labels: list | None, embeddings, batch: int = 64) -> Truth:
    """images (N, 3, H, W) in [-1, 1] at the model's pixel size -> scaled VAE latents + their conditions."""
    fam, tr, vae = bundle.family, bundle.transformer, bundle.vae
    if vae is None:
        raise ConfigError("--images needs a bundle with a VAE (a diffusers pipeline directory)")
    c = vae.config
    zs = []
    for i in range(0, len(images), batch):
        enc = vae.encode(images[i:i + batch].to(vae.device, vae.dtype))
        z = (enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latent).float().cpu()  # DC-AE: .latent
        zs.append((z - (getattr(c, "shift_factor", None) or 0.0)) * c.scaling_factor)
    n = len(images)
    if fam.conditioning == "class":
        if labels is None:
            raise ConfigError("--images for a class-conditional model needs one sub-folder per class id, e.g. DIR/7/*.png")
        n_classes = tr.config.num_embeds_ada_norm
        bad = sorted({l for l in labels if not 0 <= l < n_classes})
        if bad:
            raise ConfigError(f"--images: class folders {bad} are out of range (this model has classes 0..{n_classes - 1})")
        cond = {"class_labels": torch.tensor(labels)}
        conds = Conditions(cond, fam.null_cond(tr, cond), "labels", list(labels))
    else:
        if embeddings is None:
            raise ConfigError("--images for a text model needs --embeddings: image i (in name order) pairs with prompt "
                              "row i (cycled)")
        prompts, cond, uncond = embeddings
        rows = [i % len(prompts) for i in range(n)]
        pick = lambda d: None if d is None else {k: v[rows] for k, v in d.items()}  # noqa: E731
        conds = Conditions(pick(cond), pick(uncond), "embeddings", [prompts[r] for r in rows])
    return Truth(torch.cat(zs), conds)


# -- the job -----------------------------------------------------------------------------------------------

def prepare(ctx):
    """The student, its loss and the plan (see ops.distill.Mode)."""
    from .common import Job

    cfg, fam = ctx.cfg, ctx.student.family
    student, teacher = ctx.trainable, ctx.teacher.transformer
    device = ctx.device
    ctx.log(f"pool: the teacher samples {cfg.pool_size} trajectories at its default settings")
    pool = trajectory_pool(ctx.teacher, cfg.pool_size, cfg.seed, device, ctx.embeddings, progress=ctx.pool_progress)
    truth = None
    if ctx.images is not None:
        images, labels = ctx.images
        truth = encode_images(ctx.teacher, images, labels, ctx.embeddings)

    pairs, source = block_map(ctx.student, teacher)
    pairs = _matching_pairs(fam, student, teacher, pool, pairs, device) if cfg.feature_weight > 0 else []
    t_cap = Capture(teacher, sorted({t for _, t in pairs}))
    s_cap = Capture(student, [s for s, _ in pairs])
    dtype = next(student.parameters()).dtype
    n_t = pool.states.shape[1]
    sched = make_scheduler(fam, ctx.teacher.scheduler, pool.sampler)
    acp = getattr(sched, "alphas_cumprod", None)

    def loss_fn(model, g, rank, world):
        unwrap(model).eval()  # no label / attention dropout: the student must answer exactly what it is asked
        micro = ctx.micro_batch
        idx = local_rows(micro, g, pool.size, rank, world)
        traj, step = idx // n_t, idx % n_t
        x = pool.states[traj, step].to(device, dtype)
        t = pool.timesteps[step].to(device)
        cond = pool.conds.rows(traj)
        if pool.cfg:  # both branches of the sampler's call, at the same latent
            unc = pool.conds.rows(traj, uncond=True)
            x, t = torch.cat([x, x]), torch.cat([t, t])
            cond = {k: torch.cat([cond[k], unc[k]]) for k in cond}
        cond = to_device(cond, device, dtype)
        rows_global = micro * (2 if pool.cfg else 1)
        with torch.no_grad():
            target = fam.predict(teacher, x, t, cond, pool.guidance).float()
        out = fam.predict(Routed(model, student), x, t, cond, pool.guidance).float()
        per_row = cfg.output_weight * ((out - target) ** 2).flatten(1).mean(1)
        if pool.cfg and cfg.cfg_weight > 0:  # the guidance direction (cond - uncond), relative, on the cond rows
            m = len(out) // 2
            d_s, d_t = (out[:m] - out[m:]).flatten(1), (target[:m] - target[m:]).flatten(1)
            rel = ((d_s - d_t) ** 2).mean(1) / (d_t ** 2).mean(1).clamp_min(1e-8)
            per_row = per_row + cfg.cfg_weight * torch.cat([rel, torch.zeros_like(rel)])
        if pairs:
            feat = 0.0
            for s_name, t_name in pairs:
                for s_out, t_out in zip(s_cap.take(s_name), t_cap.out[t_name]):
                    feat = feat + feature_error(s_out, t_out.detach(), cfg.mask_outliers)
            per_row = per_row + cfg.feature_weight * feat / len(pairs)
        t_cap.out.clear()
        loss = reduce_rows(per_row, rows_global, world)
        if truth is not None:
            loss = loss + cfg.gt_weight * _truth_loss(fam, Routed(model, student), truth, acp, g, micro, rank, world,
                                                       device, dtype, pool.guidance)
        return loss

    what = f"all {sum(p.numel() for p in student.parameters()):,} student parameters"
    data = (f"data-free: {pool.describe()['trajectories']} teacher trajectories ({pool.sampler}, {pool.steps} steps, "
            f"guidance {pool.guidance}) on {pool.conds.kind}")
    if truth is not None:
        data += f" + ground truth: {len(truth.latents)} images (weight {cfg.gt_weight})"
    plan = {"trains": what, "data": data, "teacher_blocks": len(list(_all_blocks(fam, teacher))),
            "student_blocks": len(list(_all_blocks(fam, student))),
            "feature_pairs": len(pairs), "mapping_source": source if pairs else "feature loss off"}
    report = {"pool": pool.describe(), "mapping": [f"{s} <- {t}" for s, t in pairs],
              "mapping_source": plan["mapping_source"],
              "losses": {"output_weight": cfg.output_weight, "feature_weight": cfg.feature_weight,
                         "cfg_weight": cfg.cfg_weight if pool.cfg else 0.0, "mask_outliers": cfg.mask_outliers,
                         "gt_weight": cfg.gt_weight if truth is not None else 0.0},
              "ground_truth_images": 0 if truth is None else int(len(truth.latents))}
    rows = ctx.micro_batch * (2 if pool.cfg else 1)
    return Job(model=student, loss_fn=loss_fn, defaults=dict(ctx.student.defaults()), scheduler=None,
               plan=plan, report=report, rows_per_step=rows,
               data_bytes=pool.nbytes() + (truth.nbytes() if truth is not None else 0),
               close=lambda: (t_cap.close(), s_cap.close()))


def _all_blocks(fam, tr):
    for s in _stacks(fam):
        yield from getattr(tr, s.attr)


@torch.no_grad()
def _matching_pairs(fam, student, teacher, pool: Pool, pairs, device) -> list[tuple[str, str]]:
    """The pairs whose block outputs have the same shapes (one probe call on the first pool point)."""
    names_t = sorted({t for _, t in pairs})
    t_cap, s_cap = Capture(teacher, names_t), Capture(student, [s for s, _ in pairs])
    try:
        x = pool.states[:1, 0].to(device, next(student.parameters()).dtype)
        t = pool.timesteps[:1].to(device)
        cond = to_device(pool.conds.rows(torch.tensor([0])), device, x.dtype)
        fam.predict(teacher, x, t, cond, pool.guidance)
        fam.predict(student, x, t, cond, pool.guidance)
        ok = []
        for s, t_name in pairs:
            a, b = s_cap.out.get(s, []), t_cap.out.get(t_name, [])
            if a and len(a) == len(b) and all(u.shape == v.shape for u, v in zip(a, b)):
                ok.append((s, t_name))
        return ok
    finally:
        t_cap.close()
        s_cap.close()


def _truth_loss(fam, student, truth: Truth, acp, g, micro, rank, world, device, dtype, guidance) -> torch.Tensor:
    """The denoising loss on ground-truth latents (epsilon or flow-velocity target), per row, reduced."""
    n = len(truth.latents)
    idx = torch.randint(0, n, (micro,), generator=g)
    t = torch.randint(0, 1000, (micro,), generator=g)
    noise = torch.randn((micro, *truth.latents.shape[1:]), generator=g)
    null = torch.rand(micro, generator=g) < GT_NULL_PROB
    idx, t, noise, null = idx[rank::world], t[rank::world], noise[rank::world], null[rank::world]
    x0 = truth.latents[idx]
    if fam.prediction == "flow":
        s = (t.float() / 1000).view(-1, 1, 1, 1)
        x, target, tt = (1 - s) * x0 + s * noise, noise - x0, t.float()
    else:
        a = acp[t].float().view(-1, 1, 1, 1)
        x, target, tt = a.sqrt() * x0 + (1 - a).sqrt() * noise, noise, t
    cond = truth.conds.rows(idx)
    if truth.conds.uncond is not None and null.any():
        unc = truth.conds.rows(idx, uncond=True)
        cond = {k: torch.where(null.view(-1, *([1] * (v.dim() - 1))), unc[k], v) for k, v in cond.items()}
    out = fam.predict(student, x.to(device, dtype), tt.to(device), to_device(cond, device, dtype), guidance).float()
    per_row = ((out - target.to(device)) ** 2).flatten(1).mean(1)
    return reduce_rows(per_row, micro, world)
