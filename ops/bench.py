"""bench(bundles, BenchConfig) -> (bundles, BenchReport): time and judge variants against their base.

What is measured, for each model (bundles[0] is the base), in one process:
  1. quality: images from every model that has a VAE, on the same labels/prompts and per-image seeds
     (ops.generate, sharded across processes under a launcher), compared with the base's: PSNR, SSIM,
     and, with a judge (the base's, else the first variant's), class accuracy and Frechet distance;
  2. per-step latency: one transformer call on the rows a sampler step needs for B images (2B with
     classifier-free guidance, B without: the same call the end-to-end loop makes), at every batch size;
  3. end-to-end latency: denoise + decode of B images at the model's own sampler and step count;
  4. peak memory, FLOPs of the timed call (torch's FlopCounterMode), and the device's dense matmul peak.
Timing interleaves the models (A B, then B A, ...) after warm-up rounds, so the drift of a shared
machine hits them alike; figures are medians with p90. Only rank 0 times; other ranks return None.
"""
from __future__ import annotations

import math
import os
import platform
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ditkit.formats.errors import ConfigError, check_options, choice_error

from . import distributed
from .generate import GenerateConfig, conditions, generate, latent_hw, settings
from .info import count_params
from .metrics import (PSNR_CAP_DB, MatmulProbe, Timer, median, memory_method, module_bytes, p90, peak_growth,
                      psnr, ssim)
from .runtime import resolve_device, resolve_dtype
from .sample import SAMPLERS, decode, denoise, image_noise, make_scheduler

STEP_SAMPLE_MS = 20.0  # shorter per-step calls are repeated within a round up to about this long

GATES = {  # gate name -> (metric it reads, comparison): every variant must pass
    "min_speedup": ("speedup_per_image (speedup_per_step for bare transformers)", ">="),
    "max_accuracy_drop": ("base judge_accuracy - variant judge_accuracy", "<="),
    "max_fd_ratio": ("variant judge_fd / base judge_fd", "<="),
    "min_psnr": ("psnr vs base (dB)", ">="),
}


@dataclass
class BenchConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1])  # the first one is the headline
    steps: int | None = None  # end-to-end steps for every model; default: each model's own
    sampler: str | None = None  # likewise
    num_images: int = 100  # quality images per model (10 per digit for tiny-digits); 0 skips quality
    labels: list[int] | None = None  # class families; default: the bundle's labels
    prompts: list[str] | None = None  # text families
    seed: int = 0
    quality_batch_size: int = 25  # images per generation batch; does not change the images
    warmup: int = 3  # untimed interleaved rounds before the per-step repeats
    repeats: int = 20  # timed per-step rounds (each: one call per model and batch size)
    image_repeats: int = 10  # timed end-to-end rounds, after one warm-up round; 0 skips end-to-end
    device: str = "cpu"
    dtype: str = "fp32"
    min_speedup: float | None = None
    max_accuracy_drop: float | None = None
    max_fd_ratio: float | None = None
    min_psnr: float | None = None

    def __post_init__(self):
        check_options(self)  # floats finite, seeds and counts in range (formats/errors.py)
        if not self.batch_sizes:
            raise ConfigError("--batch-sizes needs at least one batch size, e.g. 1,8")
        if any(b < 1 for b in self.batch_sizes) or len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ConfigError(f"--batch-sizes must be distinct integers >= 1 (got {self.batch_sizes})")
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise ConfigError(f"--steps must be in 1..1000 (got {self.steps})")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise choice_error("sampler", self.sampler, SAMPLERS)
        for name, lo in (("num_images", 0), ("quality_batch_size", 1), ("warmup", 0), ("repeats", 1),
                         ("image_repeats", 0)):
            if getattr(self, name) < lo:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {lo} (got {getattr(self, name)})")
        for name in GATES:
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v < 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0 (got {v})")
        resolve_dtype(self.dtype, resolve_device(self.device))

    def gates(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in GATES if getattr(self, k) is not None}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BatchResult:
    batch_size: int  # images per sampler step / per end-to-end run
    rows_per_call: int  # transformer batch of one step: 2 x batch_size with classifier-free guidance
    latency_ms_per_step: float
    latency_ms_per_step_p90: float
    latency_ms_per_image: float | None = None  # end-to-end (denoise + decode) / batch_size
    latency_ms_per_image_p90: float | None = None
    images_per_s: float | None = None
    peak_memory_bytes: int | None = None
    flops_per_step: int | None = None  # None where torch cannot see the FLOPs (an onnxruntime session)
    achieved_flops: float | None = None  # flops_per_step / median per-step latency
    mfu: float | None = None  # achieved_flops / the probe's dense matmul peak
    speedup_per_step: float | None = None  # base / this, paired per round, same batch size (see speedup_basis)
    speedup_per_image: float | None = None
    cpu_ms_per_step: float | None = None  # CPU device: process CPU time of a step (median)
    cpu_ms_per_image: float | None = None


@dataclass
class Quality:
    n_images: int
    reference: bool = False  # the base: the images everything else is compared with
    identical: bool | None = None  # every image bit-identical to the base's
    psnr: float | None = None  # dB, mean over images, each capped at PSNR_CAP_DB
    ssim: float | None = None
    judge_accuracy: float | None = None
    judge_fd: float | None = None
    note: str | None = None


@dataclass
class ModelResult:
    name: str
    path: str | None
    family: str
    kind: str
    role: str  # base | variant
    params: int  # transformer
    params_total: int
    disk_bytes: int  # transformer weights
    disk_bytes_total: int
    dtype: str
    kernels: dict
    sampler: str | None
    steps: int | None
    guidance: float | None
    cfg: bool
    batch_size: int
    latency_ms_per_step: float
    latency_ms_per_step_p90: float
    latency_ms_per_image: float | None
    latency_ms_per_image_p90: float | None
    images_per_s: float | None
    peak_memory_bytes: int | None
    flops_per_step: int | None
    achieved_flops: float | None
    mfu: float | None
    speedup_per_step: float | None
    speedup_per_image: float | None
    speedup_is_real: bool  # False for fake-quantized / fallback kernels: their ratio is not a real speedup
    by_batch_size: list[dict]
    quality: dict | None


@dataclass
class Gate:
    name: str
    model: str
    metric: str
    value: float | None
    threshold: float
    passed: bool
    note: str | None = None


@dataclass
class BenchReport:
    device: str
    device_name: str
    dtype: str
    torch: str
    cuda: str | None
    threads: int
    world_size: int
    peak_flops: float
    peak_flops_dtype: str
    peak_flops_matmul: int  # n of the n x n x n probe
    memory_method: str
    speedup_basis: str  # "cpu-time" (CPU, one torch thread) or "wall-clock"
    load_average: dict  # 1-minute load average before and after timing, and the CPU count
    warnings: list[str]
    timing: dict
    config: dict
    models: list[dict]
    gates: list[dict]
    passed: bool

    def failed_gates(self) -> list[dict]:
        return [g for g in self.gates if not g["passed"]]

    def to_dict(self) -> dict:
        return _clean(asdict(self))


def _clean(x):
    """JSON-safe: NaN and infinities become None (JSON has neither)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# -- what ran: the kernels of linear layers ---------------------------------------------------------

def _linear_like(m: nn.Module) -> bool:
    name = type(m).__name__
    return isinstance(m, nn.Linear) or ("Linear" in name and not name.endswith("PackedParams"))


def kernels(module: nn.Module) -> dict:
    """The linear-layer kernel paths of a transformer: class counts, weight dtypes, declared kernels.

    A module may declare its path with a `ditkit_kernel` string attribute, and a fake-quantized or
    dense-fallback path with `fake_quant = True` / `kernel_fallback = True` (or a class name with
    'Fake'); any of these marks the model's speedup as not real.
    """
    classes, dtypes, declared = Counter(), Counter(), Counter()
    fake = fallback = False
    for m in module.modules():
        k = getattr(m, "ditkit_kernel", None)
        if isinstance(k, str):
            declared[k] += 1
            fake |= "fake" in k.lower()
            fallback |= "fallback" in k.lower()
        fake |= bool(getattr(m, "fake_quant", False)) or "Fake" in type(m).__name__
        fallback |= bool(getattr(m, "kernel_fallback", False))
        session = getattr(m, "session", None)  # an onnxruntime session wrapped as a module (ONNX bundles)
        if hasattr(session, "get_providers"):
            declared[f"onnxruntime {session.get_providers()[0]}"] += 1
        if not _linear_like(m) or any(_linear_like(c) for c in m.modules() if c is not m):
            continue  # count the layer that does the matmul, not wrappers around it
        cls = type(m)
        classes[f"{cls.__module__}.{cls.__qualname__}"] += 1
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            dtypes[str(w.dtype).replace("torch.", "")] += 1
    dense = sum(n for c, n in classes.items() if c == "torch.nn.modules.linear.Linear")
    parts = []
    if dense == sum(classes.values()) and dtypes:
        parts.append("dense " + "/".join(_short_dtype(d) for d in sorted(dtypes)))
    else:
        parts += [f"{c.rsplit('.', 1)[-1]} x{n}" for c, n in sorted(classes.items()) if not c.startswith("torch.nn.")]
        if dense:
            parts.append(f"dense x{dense}")
    parts += [f"{k} x{n}" for k, n in sorted(declared.items())]
    summary = ", ".join(parts) or "no linear layers"
    if fake:
        summary = "FAKE-QUANT: " + summary
    elif fallback:
        summary = "FALLBACK: " + summary
    return {"summary": summary, "linear_classes": dict(classes), "weight_dtypes": dict(dtypes),
            "declared": dict(declared), "fake_quant": fake, "fallback": fallback, "real": not (fake or fallback)}


def _short_dtype(d: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(d, d)


# -- one model's timed calls --------------------------------------------------------------------------

class _Subject:
    """A model and the exact calls bench times for it, per batch size."""

    def __init__(self, name: str, bundle, cfg: BenchConfig, device: str, dtype: torch.dtype, embeddings):
        self.name, self.bundle, self.device = name, bundle, device
        fam, tr = bundle.family, bundle.transformer
        self.makes_images = bundle.vae is not None
        self.sampler, self.steps, self.guidance = settings(bundle, GenerateConfig(steps=cfg.steps, sampler=cfg.sampler))
        self.cfg = fam.uses_cfg(tr, self.guidance)
        self.hw = latent_hw(bundle, None, None)
        self.shape = (fam.latent_channels(tr), *self.hw)
        self.gcfg = GenerateConfig(labels=cfg.labels, prompts=cfg.prompts, num_images=cfg.num_images or None,
                                   steps=cfg.steps, sampler=cfg.sampler, seed=cfg.seed,
                                   batch_size=cfg.quality_batch_size, device=device, dtype=cfg.dtype)
        self.seed, self.dtype = cfg.seed, dtype
        self.cond = None  # (cond, uncond) rows per condition value, when this model has real conditioning
        if self.makes_images or fam.conditioning == "class" or embeddings is not None:
            values, cond, uncond = conditions(bundle, self.gcfg, device, embeddings)
            if self.cfg and uncond is None:
                raise ConfigError(f"{name}: guidance {self.guidance} needs unconditional embeddings; the embeddings "
                                  "file has no negative_* tensors")
            self.values, self.cond = values, (cond, uncond)
        if self.makes_images:
            make_scheduler(fam, bundle.scheduler, self.sampler)  # a bad --sampler fails before any work

    def _rows(self, b: int):
        cond, uncond = self.cond
        idx = [i % len(self.values) for i in range(b)]

        def pick(d):
            return None if d is None else {k: (v[idx].to(self.dtype) if v.is_floating_point() else v[idx])
                                           for k, v in d.items()}
        return pick(cond), (pick(uncond) if self.cfg else None)

    def step_call(self, b: int) -> Callable[[], object]:
        """One denoising step's transformer call for b images."""
        fam, tr = self.bundle.family, self.bundle.transformer
        rows = 2 * b if self.cfg else b
        if self.cond is None:  # bare text transformer without embeddings: the family's dummy conditioning
            x, t, both = fam.dummy_inputs(tr, rows, self.hw, self.seed)
        else:
            c, u = self._rows(b)
            x = image_noise(self.seed, list(range(b)), self.shape).to(self.device, self.dtype)
            if self.cfg:
                x, both = torch.cat([x, x]), {k: torch.cat([c[k], u[k]]) for k in c}
            else:
                both = c
            t = torch.full((rows,), 500.0, device=self.device)
        return lambda: fam.predict(tr, x, t, both, self.guidance)

    def image_call(self, b: int) -> Callable[[], object]:
        """Denoise + decode of b images at this model's own sampler and steps."""
        fam, bundle = self.bundle.family, self.bundle
        c, u = self._rows(b)
        noise = image_noise(self.seed, list(range(b)), self.shape).to(self.device)

        from .generate import step_predictor

        make_predict, _ = step_predictor(bundle, self.sampler, self.steps, self.guidance)  # feedback or cache, if any

        def run():
            sched = make_scheduler(fam, bundle.scheduler, self.sampler)
            predict = make_predict() if make_predict else None
            return decode(bundle.vae, denoise(fam, bundle.transformer, sched, noise, c, u, self.guidance, self.steps,
                                              predict=predict))
        return run


def _resident_(bundle) -> None:
    """Copy CPU weights into process memory. safetensors loads them as file-backed mmaps, which the kernel
    may drop and re-read under memory pressure (page faults inside timed calls) and which make the
    resident set move with the page cache instead of with the model's own allocations."""
    for m in [bundle.transformer, *bundle.components.values()]:
        if isinstance(m, nn.Module):
            for t in [*m.parameters(), *m.buffers()]:
                if t.device.type == "cpu":
                    t.data = t.data.clone()


def _count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _names(bundles) -> list[str]:
    seen, out = Counter(), []
    for b in bundles:
        seen[b.name] += 1
        out.append(b.name if seen[b.name] == 1 else f"{b.name} #{seen[b.name]}")
    return out


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        i = torch.device(device).index or 0
        p = torch.cuda.get_device_properties(i)
        return f"{p.name} (compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores"


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _check_gates(cfg: BenchConfig, subjects: list[_Subject], judge) -> None:
    """Refuse gates that cannot be evaluated before any work is done."""
    gates = cfg.gates()
    if not gates:
        return
    if len(subjects) < 2:
        raise ConfigError(f"gates ({', '.join('--' + g.replace('_', '-') for g in gates)}) compare variants with "
                          "the base: give BASE and at least one VARIANT")
    needs_images = [g for g in gates if g in ("min_psnr", "max_accuracy_drop", "max_fd_ratio")]
    if needs_images:
        flag = "--" + needs_images[0].replace("_", "-")
        if cfg.num_images == 0:
            raise ConfigError(f"{flag} needs quality images; drop --num-images 0")
        bare = [s.name for s in subjects if not s.makes_images]
        if bare:
            raise ConfigError(f"{flag} needs images, but {bare[0]} is a bare transformer (no VAE); "
                              "bench pipeline directories")
    judged = [g for g in gates if g in ("max_accuracy_drop", "max_fd_ratio")]
    if judged and judge is None:
        raise ConfigError(f"--{judged[0].replace('_', '-')} needs a judge, and no model has one "
                          "(tiny-digits pipelines carry theirs in judge/)")


# -- the op -------------------------------------------------------------------------------------------

@torch.inference_mode()
def bench(bundles: list, cfg: BenchConfig, embeddings=None,
          log: Callable[[str], None] | None = None) -> tuple[list, BenchReport | None]:
    """Measure bundles[0] (the base) and bundles[1:] (variants); the report is None on ranks other than 0."""
    log = log or (lambda msg: None)
    if not bundles:
        raise ConfigError("bench needs at least one model")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    subjects = [_Subject(n, b, cfg, device, dtype, embeddings) for n, b in zip(_names(bundles), bundles)]
    judge = next((b.judge for b in bundles if b.judge is not None), None)
    if judge is not None and bundles[0].family.conditioning != "class":
        judge = None
    _check_gates(cfg, subjects, judge)
    if device == "cpu":
        for b in bundles:
            _resident_(b)

    # 1. Quality: every rank generates its shard; rank 0 gets all images.
    images: dict[str, np.ndarray | None] = {}
    if cfg.num_images:
        for s in subjects:
            if s.makes_images:
                log(f"quality: {cfg.num_images} images from {s.name}")
                images[s.name], rep = generate(s.bundle, s.gcfg, embeddings)
                s.conditions = rep.conditions
    rank, world_size = distributed.world()
    if rank != 0:
        return bundles, None
    quality = _quality(subjects, images, judge)

    # 2. The device's dense matmul peak, measured now, on this machine.
    load_before = _load()
    log("probing the dense matmul peak")
    timer = Timer(device)
    probe = MatmulProbe(device)
    probe.burst(timer)  # and once more in every timing round below

    # 3. FLOPs of each timed call (one untimed call per model and batch size, also warming up).
    steps = {(s.name, b): s.step_call(b) for s in subjects for b in cfg.batch_sizes}
    flops = {key: _count_flops(fn) for key, fn in steps.items()}

    # 4. Per-step latency: interleaved rounds, alternating the order (A B, B A, ...).
    step_ms, step_cpu = _interleave(subjects, cfg.batch_sizes, steps, cfg.warmup, cfg.repeats, timer, log, "per-step",
                          target_ms=STEP_SAMPLE_MS, probe=probe)

    # 5. End-to-end latency per image at each model's own sampler and steps.
    imaging = [s for s in subjects if s.makes_images and cfg.image_repeats]
    calls = {(s.name, b): s.image_call(b) for s in imaging for b in cfg.batch_sizes}
    image_ms, image_cpu = _interleave(imaging, cfg.batch_sizes, calls, 1, cfg.image_repeats, timer, log, "end-to-end",
                           probe=probe)
    peak = probe.peak
    # speedups: CPU time with one thread (= wall time on an idle core, and immune to other jobs on the
    # machine); wall time otherwise (with more threads, CPU time would count parallel work, not latency)
    by_cpu = device == "cpu" and torch.get_num_threads() == 1
    step_basis, image_basis = (step_cpu, image_cpu) if by_cpu else (step_ms, image_ms)

    # 6. Peak memory, last (the CPU meter changes how glibc allocates, which would slow timed calls).
    log("measuring peak memory")
    memory = {}
    for s in subjects:
        for b in cfg.batch_sizes:
            fn = calls.get((s.name, b)) or steps[(s.name, b)]
            weights = module_bytes(s.bundle.transformer, s.bundle.vae if (s.name, b) in calls else None)
            growth = peak_growth(fn, device)
            memory[(s.name, b)] = None if growth is None else weights + growth

    load = {"before": load_before, "after": _load(), "cpus": os.cpu_count()}
    warnings = []
    busy = max((x for x in (load_before, load["after"]) if x is not None), default=None)
    if device == "cpu" and busy is not None and busy > 0.75 * (os.cpu_count() or 1):
        w = (f"the machine was busy (1-minute load average {busy:.1f} on {os.cpu_count()} cores): wall-clock "
             "latencies are inflated and noisy")
        if by_cpu:
            w += "; speedups use CPU time (one thread), which other jobs do not inflate"
        else:
            w += ("; speedups are wall-clock ratios; --threads 1 makes them CPU-time ratios, which other jobs do "
                  "not inflate, and avoids OpenMP threads waiting for each other")
        warnings.append(w)
    for w in warnings:
        log(f"warning: {w}")

    # 7. Assemble, with speedups against the base at each batch size.
    base = subjects[0]
    results = []
    for i, s in enumerate(subjects):
        rows = []
        for b in cfg.batch_sizes:
            sm, im = step_ms[(s.name, b)], image_ms.get((s.name, b))
            med = median(sm)
            r = BatchResult(batch_size=b, rows_per_call=2 * b if s.cfg else b, latency_ms_per_step=round(med, 4),
                            latency_ms_per_step_p90=round(p90(sm), 4), flops_per_step=flops[(s.name, b)] or None,
                            peak_memory_bytes=memory[(s.name, b)])
            if r.flops_per_step:
                r.achieved_flops = round(r.flops_per_step / (med / 1e3), 1)
                r.mfu = round(r.achieved_flops / peak, 6)
            if im:
                r.latency_ms_per_image = round(median(im) / b, 4)
                r.latency_ms_per_image_p90 = round(p90(im) / b, 4)
                r.images_per_s = round(1e3 / r.latency_ms_per_image, 4)
            if step_cpu:
                r.cpu_ms_per_step = round(median(step_cpu[(s.name, b)]), 4)
            if im and image_cpu:
                r.cpu_ms_per_image = round(median(image_cpu[(s.name, b)]) / b, 4)
            key, base_key = (s.name, b), (base.name, b)
            r.speedup_per_step = round(paired_speedup(step_basis[base_key], step_basis[key]), 4)
            if im and image_ms.get(base_key):
                r.speedup_per_image = round(paired_speedup(image_basis[base_key], image_basis[key]), 4)
            rows.append(asdict(r))
        results.append(_model_result(s, i, rows, quality.get(s.name)))
    if any((row["mfu"] or 0) > 1 for m in results for row in m["by_batch_size"]):
        warnings.append("a model ran above the measured matmul peak (MFU > 1): the load on this machine changed "
                        "during the run, so its MFU figures are not meaningful")
        log(f"warning: {warnings[-1]}")
    gates = _gates(cfg, results)
    report = BenchReport(
        device=device, device_name=_device_name(device), dtype=cfg.dtype, torch=torch.__version__,
        cuda=torch.version.cuda if device.startswith("cuda") else None, threads=torch.get_num_threads(),
        world_size=world_size, peak_flops=round(peak, 1), peak_flops_dtype=probe.dtype_name,
        peak_flops_matmul=probe.n,
        memory_method=memory_method(device), speedup_basis="cpu-time" if by_cpu else "wall-clock", load_average=load, warnings=warnings,
        timing={"warmup_rounds": cfg.warmup, "step_repeats": cfg.repeats, "image_warmup_rounds": 1,
                "image_repeats": cfg.image_repeats, "order": "interleaved, alternating (A B, B A, ...)",
                "statistic": "median and p90 of the timed rounds; speedup = median of per-round base/model ratios "
                             "(of CPU time with one CPU thread, else of wall time)",
                "step_sample_ms": STEP_SAMPLE_MS,
                "peak_probe": f"best of {probe.samples} matmuls: a burst before timing, then one per round",
                "per_step": "one transformer call on the rows a sampler step needs: 2 x batch with CFG",
                "per_image": "denoise + VAE decode of a batch at the model's own sampler and steps, / batch"},
        config=cfg.to_dict(), models=results, gates=[asdict(g) for g in gates], passed=all(g.passed for g in gates))
    return bundles, report


def _interleave(subjects, batch_sizes, calls, warmup, repeats, timer, log, what, target_ms=0.0,
                probe=None) -> tuple[dict, dict]:
    """({(name, b): [wall ms per call, one per timed round]}, the same in CPU ms (CPU device; else {})).

    Rounds alternate the model order (A B, then B A), and the matmul probe runs once per round.

    After the warm-up rounds, a call shorter than `target_ms` is repeated back to back within its round
    (the same count in every round) so that one sample is not a single sub-millisecond call.
    """
    out = {key: [] for key in calls}
    cpu = {key: [] for key in calls}
    inner = {key: 1 for key in calls}
    if not subjects:
        return {}, {}
    for r in range(warmup + repeats):
        if r == warmup and warmup and target_ms:
            inner = {key: max(1, min(100, round(target_ms / max(median(out[key]), 1e-3)))) for key in calls}
            out, cpu = {key: [] for key in calls}, {key: [] for key in calls}
        if r == 0 or r == warmup:
            log(f"{what}: {'timing' if r >= warmup else 'warming up'} ({warmup} warm-up + {repeats} rounds)")
        for s in (subjects if r % 2 == 0 else subjects[::-1]):
            for b in batch_sizes:
                fn, n = calls[(s.name, b)], inner[(s.name, b)]
                ms = timer(fn if n == 1 else lambda: [fn() for _ in range(n)]) / n
                out[(s.name, b)].append(ms)
                if timer.cpu_ms is not None:
                    cpu[(s.name, b)].append(timer.cpu_ms / n)
        if probe is not None:
            probe.record(timer(probe))
    return ({key: v[-repeats:] for key, v in out.items()},
            {key: v[-repeats:] for key, v in cpu.items() if v})


def paired_speedup(base: list[float], other: list[float]) -> float:
    """Median over rounds of base / other, each pair timed side by side in one round (cancels drift)."""
    return median([a / b for a, b in zip(base, other)])


def _quality(subjects, images, judge) -> dict[str, dict]:
    """Per model: its images compared with the base's on identical seeds, and judged."""
    from .judge import score

    base = subjects[0]
    ref = images.get(base.name)
    out = {}
    for s in subjects:
        img = images.get(s.name)
        if img is None:
            continue
        q = Quality(n_images=len(img), reference=s is base)
        if s is not base:
            if ref is None:
                q.note = "the base makes no images"
            elif ref.shape != img.shape:
                q.note = f"image shape {list(img.shape[1:])} differs from the base's {list(ref.shape[1:])}"
            else:
                q.identical = bool(np.array_equal(ref, img))
                q.psnr, q.ssim = round(psnr(ref, img), 4), round(ssim(ref, img), 6)
        if judge is not None:
            js = score(judge, img, s.conditions)
            q.judge_accuracy, q.judge_fd = round(js.accuracy, 6), round(js.fd, 6)
        out[s.name] = asdict(q)
    return out


def _model_result(s: _Subject, i: int, rows: list[dict], quality: dict | None) -> dict:
    b = s.bundle
    modules = [b.transformer] + [c for c in b.components.values() if isinstance(c, nn.Module)]
    head = rows[0]
    k = kernels(b.transformer)
    p = next(b.transformer.parameters(), None)
    return asdict(ModelResult(
        name=s.name, path=str(b.path.resolve()) if b.path else None, family=b.family.name, kind=b.kind,
        role="base" if i == 0 else "variant", params=count_params(b.transformer),
        params_total=sum(count_params(m) for m in modules), disk_bytes=b.transformer_bytes_on_disk(),
        disk_bytes_total=b.bytes_on_disk(), dtype=str(p.dtype).replace("torch.", "") if p is not None else "",
        kernels=k, sampler=s.sampler if s.makes_images else None, steps=s.steps if s.makes_images else None,
        guidance=s.guidance, cfg=s.cfg, batch_size=head["batch_size"],
        latency_ms_per_step=head["latency_ms_per_step"], latency_ms_per_step_p90=head["latency_ms_per_step_p90"],
        latency_ms_per_image=head["latency_ms_per_image"], latency_ms_per_image_p90=head["latency_ms_per_image_p90"],
        images_per_s=head["images_per_s"], peak_memory_bytes=head["peak_memory_bytes"],
        flops_per_step=head["flops_per_step"], achieved_flops=head["achieved_flops"], mfu=head["mfu"],
        speedup_per_step=head["speedup_per_step"], speedup_per_image=head["speedup_per_image"],
        speedup_is_real=k["real"], by_batch_size=rows, quality=quality))


def _gates(cfg: BenchConfig, results: list[dict]) -> list[Gate]:
    gates = []
    base = results[0]
    bq = base["quality"] or {}
    for name, threshold in cfg.gates().items():
        for m in results[1:]:
            q, note = m["quality"] or {}, None
            if name == "min_speedup":
                value = m["speedup_per_image"] if m["speedup_per_image"] is not None else m["speedup_per_step"]
                metric = "speedup_per_image" if m["speedup_per_image"] is not None else "speedup_per_step"
                passed = value >= threshold and m["speedup_is_real"]
                if not m["speedup_is_real"]:
                    note = f"{m['kernels']['summary']}: not a real speedup"
            elif name == "min_psnr":
                metric, value = "psnr", q.get("psnr")
                passed = value is not None and value >= threshold
            elif name == "max_accuracy_drop":
                metric = "judge_accuracy drop"
                a, v = bq.get("judge_accuracy"), q.get("judge_accuracy")
                value = None if a is None or v is None else round(a - v, 6)
                passed = value is not None and value <= threshold
            else:  # max_fd_ratio
                metric = "judge_fd ratio"
                a, v = bq.get("judge_fd"), q.get("judge_fd")
                value = None if a is None or v is None else (v / a if a > 0 else (1.0 if v == 0 else math.inf))
                value = None if value is None or not math.isfinite(value) else round(value, 6)
                passed = value is not None and value <= threshold
            if value is None and note is None:
                note = "metric unavailable"
            gates.append(Gate(name=name, model=m["name"], metric=metric, value=value, threshold=threshold,
                              passed=bool(passed), note=note))
    return gates


def describe_failures(report: BenchReport) -> str:
    """One line naming each failed gate: 'min_speedup on x: 1.01 < 100; ...'."""
    parts = []
    for g in report.failed_gates():
        op = GATES[g["name"]][1].replace(">=", "<").replace("<=", ">")
        value = "n/a" if g["value"] is None else f"{g['value']:g}"
        extra = f" ({g['note']})" if g.get("note") else ""
        parts.append(f"{g['name']} on {g['model']}: {g['metric']} {value} {op} {g['threshold']:g}{extra}")
    return f"{len(parts)} quality gate(s) failed: " + "; ".join(parts)
