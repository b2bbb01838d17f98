"""Seeded calibration inputs drawn from the model's own sampling trajectories (the LD-Pruner recipe).

The base model samples `samples` images with its own sampler, steps and guidance; at `points` evenly spaced
steps of that trajectory the transformer's inputs (noisy latent, timestep, condition; the unconditional half
too when guidance is on) and its outputs are kept. Pruning is then judged by how far the pruned transformer's
output moves from the base's on exactly these inputs, and Taylor importance differentiates the denoising loss
against the target the trajectory itself implies (its final sample as x0).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from ditkit.formats.errors import ConfigError
from ditkit.ops.geometry import latent_hw
from ditkit.ops.sample import denoise, image_noise, make_scheduler

SQNR_CAP_DB = 200.0  # identical outputs have infinite SQNR; JSON has no Infinity


@dataclass
class CalibBatch:
    latents: torch.Tensor  # (B, C, h, w): the transformer's input at step t (cond rows, then uncond rows)
    t: torch.Tensor  # (B,)
    cond: dict
    output: torch.Tensor  # (B, C, h, w): the base transformer's output on these inputs
    target: torch.Tensor  # (B, C, h, w): epsilon / velocity implied by the trajectory's final sample


@dataclass
class Calibration:
    batches: list[CalibBatch]
    samples: int
    steps: int
    points: int
    seed: int
    sampler: str
    guidance: float  # passed to every call (flux embeds it)
    cfg: bool  # True when the batches hold conditional and unconditional rows
    conditions: str  # "labels", "embeddings" or "random" (text families without an embeddings file)
    timesteps: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"samples": self.samples, "steps": self.steps, "points": self.points, "seed": self.seed,
                "sampler": self.sampler, "guidance": self.guidance, "cfg": self.cfg, "conditions": self.conditions,
                "timesteps": self.timesteps, "batch": int(self.batches[0].latents.shape[0]) if self.batches else 0}


def _conditions(bundle, samples: int, seed: int, embeddings, device, dtype):
    """(cond, uncond or None, kind) with `samples` rows, seeded."""
    fam, tr = bundle.family, bundle.transformer
    g = torch.Generator().manual_seed(seed)
    if fam.conditioning == "class":
        n_classes = tr.config.num_embeds_ada_norm
        pool = [l for l in bundle.defaults().get("labels", range(n_classes)) if l < n_classes] or list(range(n_classes))
        pick = torch.randint(0, len(pool), (samples,), generator=g)
        cond = {"class_labels": torch.tensor([pool[i] for i in pick.tolist()], device=device)}
        return cond, fam.null_cond(tr, cond), "labels"
    if embeddings is not None:
        _, cond, uncond = embeddings
        rows = [i % next(iter(cond.values())).shape[0] for i in range(samples)]
        cast = lambda d: None if d is None else {  # noqa: E731
            k: (v[rows].to(device, dtype) if v.is_floating_point() else v[rows].to(device)) for k, v in d.items()}
        return cast(cond), cast(uncond), "embeddings"
    cond = fam.dummy_cond(tr, samples, g)
    cond = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in cond.items()}
    return cond, None, "random"  # random embeddings have no matching unconditional branch: no guidance


def _target(sched, prediction: str, x: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The denoising target that makes `x0` the clean sample behind the noisy input `x` at timestep `t`."""
    if prediction == "flow":  # x = (1 - s) x0 + s eps, v = eps - x0 = (x - x0) / s
        s = (t.float() / 1000).clamp_min(1e-3).view(-1, 1, 1, 1)
        return (x.float() - x0) / s
    ac = sched.alphas_cumprod.to(x.device)[t.round().long().clamp(0, len(sched.alphas_cumprod) - 1)]
    ac = ac.float().view(-1, 1, 1, 1)
    return (x.float() - ac.sqrt() * x0) / (1 - ac).sqrt().clamp_min(1e-4)


@torch.no_grad()
def calibration_set(bundle, samples: int = 4, steps: int = 10, points: int = 3, seed: int = 0,
                    embeddings=None) -> Calibration:
    """Run the base model's own sampler from seeded noise and keep `points` (input, output) pairs."""
    if points > steps:
        raise ConfigError(f"--calib-points ({points}) cannot exceed --calib-steps ({steps})")
    fam, tr = bundle.family, bundle.transformer
    p = next(tr.parameters())
    device, dtype = p.device, p.dtype
    d = bundle.defaults()
    sampler = d["sampler"]
    cond, uncond, kind = _conditions(bundle, samples, seed, embeddings, device, dtype)
    guidance = float(d["guidance"])
    if uncond is None or not fam.uses_cfg(tr, guidance):
        uncond = None
    sched = make_scheduler(fam, bundle.scheduler, sampler)
    h, w = latent_hw(bundle, None, None)
    noise = image_noise(seed, list(range(samples)), (fam.latent_channels(tr), h, w)).to(device)

    records: list[tuple] = []

    def record(x, t, c):
        out = fam.predict(tr, x, t, c, guidance)
        records.append((x, t, c, out))
        return out

    x0 = denoise(fam, tr, sched, noise, cond, uncond, guidance, steps, predict=record)
    keep = sorted({round(i * (len(records) - 1) / max(points - 1, 1)) for i in range(points)})
    x0_rows = torch.cat([x0, x0]) if uncond is not None else x0  # (B, C, h, w) matching cond + uncond rows
    batches = []
    for i in keep:
        x, t, c, out = records[i]
        batches.append(CalibBatch(latents=x, t=t, cond=c, output=out.float(),
                                  target=_target(sched, fam.prediction, x, t, x0_rows.float())))
    return Calibration(batches=batches, samples=samples, steps=steps, points=len(keep), seed=seed, sampler=sampler,
                       guidance=guidance, cfg=uncond is not None, conditions=kind,
                       timesteps=[round(float(records[i][1][0]), 3) for i in keep])


@torch.no_grad()
def output_error(family, transformer, calib: Calibration, around=None) -> dict:
    """Relative MSE and SQNR (dB) of `transformer`'s output against the base's over the calibration set.

    `around(i)`, when given, is a context manager entered around the call on batch i (depth scoring uses it to
    replay the base's outputs of the blocks before the removed one)."""
    num = den = 0.0
    for i, b in enumerate(calib.batches):
        with (around(i) if around is not None else contextlib.nullcontext()):
            y = family.predict(transformer, b.latents, b.t, b.cond, calib.guidance).float()
        num += float(((y - b.output) ** 2).sum())
        den += float((b.output ** 2).sum())
    rel = num / max(den, 1e-30)
    if not math.isfinite(rel):
        return {"rel_mse": None, "sqnr_db": None}
    sqnr = SQNR_CAP_DB if rel <= 10 ** (-SQNR_CAP_DB / 10) else -10 * math.log10(rel)
    return {"rel_mse": rel, "sqnr_db": round(sqnr, 3)}
