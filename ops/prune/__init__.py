"""prune(bundle, PruneConfig) -> (bundle, PruneReport): smaller / sparser transformers that reload as ordinary
bundles.

Methods (PRUNE_METHODS): depth (whole blocks, chosen on calibration), width (heads + MLP units + model width,
uniform), magnitude (unstructured L1), 2:4 (semi-structured). Every method is judged the same way: parameters
and FLOPs per step before / after, the fraction of zero weights, the output error against the base on a seeded
calibration set drawn from the base's own sampling trajectories, and the per-step latency of base and pruned
transformer measured in the same run.
"""
from __future__ import annotations

from typing import ClassVar

import dataclasses
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ditkit.formats.errors import ConfigError, UnsupportedModelError, check_options, choice_error
from ditkit.ops.flops import count_flops
from ditkit.ops.geometry import latent_hw
from ditkit.ops.info import count_params
from ditkit.ops.timing import paired_ratio, speedup_basis
from ditkit.ops.config import OpConfig

from . import depth, magnitude, semi24, width
from .calibration import Calibration, calibration_set, output_error
from .measure import interleaved_ms


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    run: Callable  # (bundle, cfg, calibration, say) -> (pruned transformer, plan dict)
    check: Callable | None  # (bundle, cfg) -> None; raises before any work on what cannot be done
    options: dict  # the PruneConfig fields it reads -> their default (the recommended recipe)
    structured: bool  # removes weights (smaller, faster) rather than zeroing them


PRUNE_METHODS: dict[str, Method] = {m.name: m for m in (
    Method("depth", "remove whole blocks (--ratio / --keep / --blocks), least output change first",
           depth.run, depth.check,
           # half the blocks: TinyFusion's DiT-XL/2 28 -> 14 recipe; recovered afterwards by distillation
           {"ratio": 0.5, "keep": None, "blocks": None}, True),
    Method("width", "remove attention heads, MLP units and model width uniformly (--ratio of heads)",
           width.run, width.check,
           # 0.3 of the heads: ~0.5x FLOPs, still a sensible start for distillation; taylor: the best FD after
           # recovery of the four criteria on tiny-digits (docs/prune.md)
           {"ratio": 0.3, "importance": "taylor"}, True),
    Method("magnitude", "zero the smallest weights (--sparsity, --scope per-layer|global)",
           magnitude.run, None,
           # 0.4: about where SD2 still held its quality (38.5%, arXiv 2411.15113); per-layer spares small layers
           {"sparsity": 0.4, "scope": "per-layer"}, False),
    Method("2:4", "2 of every 4 weights zeroed; fast only with CUDA cc>=8.0 semi-structured kernels",
           semi24.run, None, {}, False),
)}

IMPORTANCE = ("magnitude", "taylor", "hessian", "lamp")  # width: Torch-Pruning criteria (ops/prune/width.py)
SCOPES = ("per-layer", "global")
METHOD_OPTIONS = ("ratio", "keep", "blocks", "sparsity", "scope", "importance")


@dataclass
class PruneConfig(OpConfig):
    TYPE: ClassVar[str] = "prune"

    method: str = "depth"
    ratio: float | None = None  # depth: fraction of blocks removed; width: of heads (of MLP units: mlp_only)
    keep: int | None = None  # depth: blocks to keep
    blocks: list[int] | None = None  # depth: block indices to remove, by hand
    sparsity: float | None = None  # magnitude: fraction of prunable weights zeroed
    scope: str | None = None  # magnitude: per-layer or global threshold
    importance: str | None = None  # width: magnitude, taylor, hessian or lamp
    calib_samples: int = 4  # images sampled by the base model for calibration
    calib_steps: int = 10  # steps of those trajectories (fewer than sampling uses: the points span them all)
    calib_points: int = 3  # trajectory steps kept as calibration inputs (first, middle, last)
    seed: int = 0
    timing: bool = True  # measure per-step latency of base and pruned (off for --dry-run)
    timing_batch: int = 2  # one image with classifier-free guidance
    timing_repeats: int = 5
    device: str = "cpu"

    def __post_init__(self):
        check_options(self)  # floats finite, seeds and counts in range (formats/errors.py)
        if self.method not in PRUNE_METHODS:
            raise choice_error("method", self.method, PRUNE_METHODS)
        m = PRUNE_METHODS[self.method]
        for name in METHOD_OPTIONS:
            if getattr(self, name) is not None and name not in m.options:
                allowed = ", ".join(f"--{o}" for o in m.options) or "none"
                raise ConfigError(f"--{name} does not apply to --method {self.method} (its options: {allowed})")
        if self.method == "depth":
            given = [o for o in ("ratio", "keep", "blocks") if getattr(self, o) is not None]
            if len(given) > 1:
                raise ConfigError(f"--method depth takes one of --ratio, --keep, --blocks (got {', '.join(given)})")
            if not given:
                self.ratio = m.options["ratio"]
        else:
            for name, default in m.options.items():
                if getattr(self, name) is None:
                    setattr(self, name, default)
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ConfigError(f"--ratio must be in (0, 1), the fraction removed (got {self.ratio})")
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise ConfigError(f"--sparsity must be in (0, 1), the fraction of weights zeroed (got {self.sparsity})")
        if self.keep is not None and self.keep < 1:
            raise ConfigError(f"--keep must be >= 1 (got {self.keep})")
        if self.blocks is not None and (not self.blocks or any(b < 0 for b in self.blocks)):
            raise ConfigError(f"--blocks must list block indices >= 0, e.g. 3,7 (got {self.blocks})")
        if self.scope is not None and self.scope not in SCOPES:
            raise choice_error("scope", self.scope, SCOPES)
        if self.importance is not None and self.importance not in IMPORTANCE:
            raise choice_error("importance", self.importance, IMPORTANCE)
        for name, lo, hi in (("calib_samples", 1, 4096), ("calib_steps", 1, 1000), ("calib_points", 1, 1000),
                             ("timing_batch", 1, 4096), ("timing_repeats", 1, 1000)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ConfigError(f"--{name.replace('_', '-')} must be in {lo}..{hi} (got {v})")
        if self.calib_points > self.calib_steps:
            raise ConfigError(f"--calib-points ({self.calib_points}) cannot exceed --calib-steps ({self.calib_steps})")



@dataclass
class PruneReport:
    method: str
    family: str
    params_before: int  # transformer
    params_after: int
    params_ratio: float
    nonzero_params_after: int
    sparsity: float  # fraction of the pruned transformer's parameters that are zero
    flops_before: int  # one transformer call, batch 1, native resolution (torch FlopCounterMode; dense)
    flops_after: int
    flops_ratio: float
    calibration: dict  # the set (samples, steps, timesteps ...) and rel_mse / sqnr_db against the base
    speed: dict | None  # per-step latency, base and pruned, same run; None when not measured
    plan: dict = field(default_factory=dict)  # what was removed: blocks, heads, channels, per-layer sparsity
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _zeros(module) -> int:
    return sum(int((p == 0).sum()) for p in module.parameters())


def _speed(bundle, pruned, cfg: PruneConfig) -> dict:
    fam, base = bundle.family, bundle.transformer
    hw = latent_hw(bundle, None, None)
    inputs = fam.dummy_inputs(base, cfg.timing_batch, hw, seed=cfg.seed)
    p = next(pruned.parameters())
    kernel = "dense"
    timed = pruned
    if cfg.method == "2:4":
        ok, kernel = semi24.kernel_available(cfg.device, p.dtype)
        if ok:
            import copy

            timed = copy.deepcopy(pruned)
            names = semi24.prunable_linears(fam, timed)[0]
            n = semi24.to_semi_structured_(timed, [k for k, m in names.items() if m.in_features % semi24.GROUP == 0])
            kernel = f"{kernel}: {n} layers"
    ms = interleaved_ms(fam, {"base": base, "pruned": timed}, inputs, cfg.device, warmup=1, repeats=cfg.timing_repeats)
    how = speedup_basis(cfg.device)  # CPU time with one CPU thread (immune to other jobs), else wall time
    key = "cpu_samples_ms" if how == "cpu-time" else "samples_ms"
    ratio = paired_ratio(ms["pruned"][key], ms["base"][key])
    med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    out = {"device": cfg.device, "threads": torch.get_num_threads(), "basis": how, "batch": cfg.timing_batch,
           "latent_hw": list(hw), "warmup": 1, "repeats": cfg.timing_repeats,
           "ms_base": med(ms["base"][key]), "ms_pruned": med(ms["pruned"][key]),  # medians, on the basis
           "wall_ms_base": ms["base"]["median_ms"], "wall_ms_pruned": ms["pruned"]["median_ms"],
           "latency_ratio": round(ratio, 4),  # median of per-round pruned / base
           "speedup": round(1 / ratio, 4), "kernel": kernel,
           "samples_ms": {"base": ms["base"]["samples_ms"], "pruned": ms["pruned"]["samples_ms"]}}
    if how == "cpu-time":
        out["cpu_samples_ms"] = {"base": ms["base"]["cpu_samples_ms"], "pruned": ms["pruned"]["cpu_samples_ms"]}
    return out


def prune(bundle, cfg: PruneConfig, embeddings=None, log: Callable[[str], None] | None = None):
    """The pruned bundle (same components, judge and defaults; not saved) and its report."""
    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    from ditkit.ops.feedback import refuse

    refuse(bundle, "ditkit prune")
    method = PRUNE_METHODS[cfg.method]
    fam, base = bundle.family, bundle.transformer
    if not fam.stacks:
        raise UnsupportedModelError(f"prune does not support the {fam.name} family")
    if method.check is not None:
        method.check(bundle, cfg)
    say(f"calibration: {cfg.calib_samples} samples x {cfg.calib_steps} steps of the base model's own sampler")
    calib: Calibration = calibration_set(bundle, cfg.calib_samples, cfg.calib_steps, cfg.calib_points, cfg.seed,
                                         embeddings)
    say(f"pruning: {cfg.method}")
    pruned, plan = method.run(bundle, cfg, calib, say)
    out = dataclasses.replace(bundle, transformer=pruned, path=None, judge=bundle.judge,
                              manifest={"op": "prune", "defaults": bundle.defaults()})
    hw = latent_hw(bundle, None, None)
    err = output_error(fam, pruned, calib)
    speed = None
    if cfg.timing:
        say(f"timing: base and pruned, batch {cfg.timing_batch}, {cfg.timing_repeats} interleaved repeats")
        speed = _speed(bundle, pruned, cfg)
    n0, n1 = count_params(base), count_params(pruned)
    f0, f1 = count_flops(bundle, 1, hw), count_flops(out, 1, hw)
    zeros = _zeros(pruned)
    report = PruneReport(
        method=cfg.method, family=fam.name, params_before=n0, params_after=n1, params_ratio=round(n1 / n0, 4),
        nonzero_params_after=n1 - zeros, sparsity=round(zeros / max(n1, 1), 4), flops_before=f0, flops_after=f1,
        flops_ratio=round(f1 / max(f0, 1), 4), calibration={**calib.to_dict(), **err}, speed=speed, plan=plan,
        seconds=round(time.perf_counter() - t0, 2))
    return out, report


__all__ = ["PRUNE_METHODS", "PruneConfig", "PruneReport", "prune", "Method"]
