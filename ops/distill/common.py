"""What the distillation modes share: conditions, the teacher's trajectory pool, routing through a DDP wrapper,
per-row loss normalisation, validation through `generate`, and the memory estimate of the plan.

Everything that draws randomness takes a torch.Generator or a seed, so a pool built twice is the same pool and
a resumed run sees the data an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ditkit.formats.errors import ConfigError
from ditkit.ops.generate import GenerateConfig, generate
from ditkit.ops.geometry import latent_hw
from ditkit.ops.sample import image_seed

# noise for the pool comes from its own seed stream, far from the indices `generate` uses (0, 1, 2 ...), so a
# student is never trained on the exact noise it is later judged on
POOL_STREAM = 1 << 40


# -- conditions -------------------------------------------------------------------------------------------

@dataclass
class Conditions:
    """`n` rows of conditioning (labels cycle through the model's classes, prompts through the file)."""
    cond: dict  # name -> (n, ...) tensor
    uncond: dict | None  # the classifier-free-guidance branch, None when there is none
    kind: str  # "labels", "embeddings", "prompts" (the bundle's own, through its text encoder) or "random"
    values: list  # per row: its label, or its prompt

    def rows(self, idx: torch.Tensor, uncond: bool = False) -> dict:
        src = self.uncond if uncond else self.cond
        return {k: v[idx] for k, v in src.items()}


def conditions(bundle, n: int, seed: int, embeddings=None) -> Conditions:
    """Seeded conditions for `n` samples: balanced labels (class families), prompt rows (text families with
    an embeddings file, else the bundle's own prompts through its text encoder, as generate uses them), or
    random embeddings without an unconditional branch (a text bundle with neither)."""
    fam, tr = bundle.family, bundle.transformer
    if fam.conditioning == "class":
        n_classes = tr.config.num_embeds_ada_norm
        pool = [l for l in bundle.defaults().get("labels", range(min(n_classes, 1000))) if l < n_classes]
        pool = pool or list(range(n_classes))
        labels = [pool[i % len(pool)] for i in range(n)]
        cond = {"class_labels": torch.tensor(labels)}
        return Conditions(cond, fam.null_cond(tr, cond), "labels", labels)
    kind = "embeddings"
    if embeddings is None and bundle.defaults().get("prompts") and any(
            k.startswith("text_encoder") for k in bundle.components):
        from ..generate import GenerateConfig
        from ..geometry import conditions as encoded

        embeddings, kind = encoded(bundle, GenerateConfig(), "cpu"), "prompts"
    if embeddings is not None:
        prompts, cond, uncond = embeddings
        rows = [i % len(prompts) for i in range(n)]
        pick = lambda d: None if d is None else {k: v[rows].cpu() for k, v in d.items()}  # noqa: E731
        return Conditions(pick(cond), pick(uncond), kind, [prompts[r] for r in rows])
    g = torch.Generator().manual_seed(image_seed(seed, POOL_STREAM - 1))
    return Conditions(fam.dummy_cond(tr, n, g), None, "random", [None] * n)


def to_device(d: dict | None, device, dtype) -> dict | None:
    if d is None:
        return None
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in d.items()}


def pool_noise(seed: int, n: int, shape: tuple) -> torch.Tensor:
    """(n, *shape) initial noise of the pool's trajectories (its own seed stream, see POOL_STREAM)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, POOL_STREAM + i)))
                        for i in range(n)])


def guided(family, tr, x, t, cond: dict, uncond: dict | None, guidance: float) -> torch.Tensor:
    """The teacher's output as its sampler uses it: classifier-free guidance folded in when it has a branch."""
    if uncond is None:
        return family.predict(tr, x, t, cond, guidance).float()
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
    out = family.predict(tr, torch.cat([x, x]), torch.cat([t, t]), both, guidance).float()
    c, u = out.chunk(2)
    return u + guidance * (c - u)


# -- training helpers ----------------------------------------------------------------------------------------

class Routed:
    """Calls go through the (possibly DDP-wrapped) prepared model; attributes come from the module itself.

    Family adapters read `transformer.config` and friends, which a DistributedDataParallel wrapper hides, and
    gradients are only synchronised when the forward goes through the wrapper.
    """

    def __init__(self, prepared: nn.Module, module: nn.Module):
        self._prepared, self._module = prepared, module

    def __call__(self, *args, **kwargs):
        return self._prepared(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def local_rows(n_global: int, g: torch.Generator, high: int, rank: int, world: int) -> torch.Tensor:
    """This process's slice of `n_global` indices in [0, high) drawn from the step's generator."""
    return torch.randint(0, high, (n_global,), generator=g)[rank::world]


def reduce_rows(per_row: torch.Tensor, n_global: int, world: int) -> torch.Tensor:
    """Sum of this slice's per-row losses scaled so that DDP's gradient mean equals the single-process mean
    over the global micro-batch (exact even when the slices differ in size)."""
    return per_row.sum() * world / n_global


def memory_estimate(student: nn.Module, teacher: nn.Module | None, family, hw, rows: int, pool_bytes: int,
                    ema: bool, arch: nn.Module | None = None) -> dict:
    """Bytes: weights, gradients + AdamW state + EMA of what trains, the pool, and a rough activation figure
    (rows x tokens x hidden x blocks x 4 bytes x 24, what a transformer block keeps for backward)."""
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for p in student.parameters())
    if teacher is not None and teacher is not student:
        weights += sum(p.numel() * p.element_size() for p in teacher.parameters())
    states = trained * 4 * (3 + (1 if ema else 0))  # grad + exp_avg + exp_avg_sq (+ EMA), fp32
    n_blocks = sum(len(getattr(student, s.attr)) for s in family.stacks if hasattr(student, s.attr))
    arch = arch if arch is not None else student  # the transformer whose config gives tokens and width
    act = rows * family.image_tokens(arch, hw) * family.hidden_size(arch) * max(n_blocks, 1) * 4 * 24
    total = weights + states + pool_bytes + act
    return {"weights": weights, "optimizer_and_ema": states, "pool": pool_bytes, "activations_estimate": act,
            "total_estimate": total}


def describe_bytes(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


# -- validation --------------------------------------------------------------------------------------------

@dataclass
class Validator:
    """Seeded validation images of a bundle at fixed sampling settings, scored by the judge when there is one,
    else by PSNR against the teacher's images on the same seeds."""
    bundle: object  # a Bundle whose transformer is the student (EMA weights are swapped in by the loop)
    n: int
    seed: int
    device: str
    embeddings: object = None
    reference: np.ndarray | None = None  # the teacher's images (PSNR reference)
    on_images: Callable | None = None  # (step, images, metrics) on rank 0: the CLI writes the sample grid

    def config(self) -> GenerateConfig:
        return GenerateConfig(num_images=self.n, seed=self.seed, batch_size=min(self.n, 50), device=self.device)

    def images(self, bundle=None) -> tuple[np.ndarray | None, dict]:
        images, rep = generate(bundle or self.bundle, self.config(), self.embeddings)
        return images, {"sampler": rep.sampler, "steps": rep.steps, "guidance": rep.guidance, "judge": rep.judge}

    def __call__(self, step: int) -> dict:
        from ditkit.ops.metrics import psnr

        images, rep = self.images()
        if images is None:  # not rank 0 under a launcher
            return {}
        metrics = {"images": int(len(images)), "steps": rep["steps"], "guidance": rep["guidance"]}
        if rep["judge"] is not None:
            metrics.update(accuracy=rep["judge"]["accuracy"], fd=rep["judge"]["fd"])
        if self.reference is not None:
            metrics["psnr_vs_teacher"] = round(psnr(images, self.reference), 3)
        if self.on_images is not None:
            self.on_images(step, images, metrics)
        return metrics


def baseline(validator: Validator, teacher_bundle) -> dict:
    """The teacher at its own default settings on the validation seeds (the bar the student is held to)."""
    images, rep = validator.images(teacher_bundle)
    if images is None:
        return {}
    validator.reference = images
    out = {"images": int(len(images)), "sampler": rep["sampler"], "steps": rep["steps"], "guidance": rep["guidance"]}
    if rep["judge"] is not None:
        out.update(accuracy=rep["judge"]["accuracy"], fd=rep["judge"]["fd"])
    return out


def with_transformer(bundle, transformer, components: dict | None = None, defaults: dict | None = None):
    """A bundle sharing `bundle`'s parts with another transformer (not saved: path None)."""
    manifest = {"op": "distill", "defaults": defaults if defaults is not None else bundle.defaults()}
    return dataclasses.replace(bundle, transformer=transformer, components=components or dict(bundle.components),
                               path=None, manifest=manifest, feedback=None)


def is_main() -> bool:
    from ditkit.ops.distributed import world

    return world()[0] == 0


def native_hw(bundle) -> tuple[int, int]:
    return latent_hw(bundle, None, None)


def finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


def check_pair(student, teacher) -> None:
    """A student and a teacher must speak the same latent and conditioning language."""
    fs, ft = student.family, teacher.family
    if fs.name != ft.name:
        raise ConfigError(f"the teacher is a {ft.name} model but the student is {fs.name}; pass a --teacher of "
                          "the same family")
    cs, ct = fs.latent_channels(student.transformer), ft.latent_channels(teacher.transformer)
    if cs != ct:
        raise ConfigError(f"the teacher has {ct} latent channels but the student {cs}; they must match")
    if fs.conditioning == "class":
        ns, nt = student.transformer.config.num_embeds_ada_norm, teacher.transformer.config.num_embeds_ada_norm
        if ns != nt:
            raise ConfigError(f"the teacher has {nt} classes but the student {ns}; they must match")


@dataclass
class Job:
    """What a mode hands the loop."""
    model: nn.Module  # the student transformer; its parameters that require grad are trained
    loss_fn: Callable  # (model, generator, rank, world) -> loss
    defaults: dict  # the student's sampling defaults (sampler, steps, guidance ...)
    scheduler: object | None  # the student's scheduler component (None: keep the student's own)
    plan: dict
    report: dict
    rows_per_step: int  # transformer rows of one micro-batch (for the memory estimate)
    data_bytes: int = 0
    close: Callable = lambda: None
    transformer: nn.Module | None = None  # the output bundle's transformer (default: `model`)
    feedback: object = None  # ops.feedback.Feedback the output bundle carries (feedback mode)
