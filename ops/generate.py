"""generate(bundle, GenerateConfig) -> (images, GenerateReport): sample images, score them with the judge."""
from __future__ import annotations

from typing import ClassVar

import contextlib
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from ditkit.formats.errors import ConfigError, check_options, choice_error
from ditkit.formats.onnx_bundle import BACKENDS, resolve_backend
from ditkit.ops.config import OpConfig

from . import distributed
from .parallel import check_mode as check_parallel_mode
from .parallel import ENGINES, context_parallel
from .accelerators import step_predictor
from .compile import check_mode as check_compile_mode
from .geometry import conditions, latent_hw, settings, vae_scale
from .runtime import resolve_device, resolve_dtype, sync
from .sample import SAMPLERS, decode, denoise, image_noise, make_scheduler, padded


@dataclass
class GenerateConfig(OpConfig):
    TYPE: ClassVar[str] = "generate"

    labels: list[int] | None = None  # class-conditional families; default: the bundle's labels
    prompts: list[str] | None = None  # text families
    num_images: int | None = None  # default: one per label or prompt; images cycle through them
    steps: int | None = None  # default: the bundle's own (its manifest, else its family's)
    sampler: str | None = None
    guidance: float | None = None
    seed: int = 0
    batch_size: int = 8
    height: int | None = None  # pixels; default: the checkpoint's native size
    width: int | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    backend: str | None = None  # "pytorch" or "onnxruntime"; default: the bundle's own (ONNX bundles: onnxruntime)
    cache: bool = True  # apply the bundle's step-caching policy (ditkit cache) where it fits the run
    feedback: bool = True  # apply the bundle's feedback module (distill --mode feedback) where it fits the run
    compile: bool = False  # torch.compile the transformer (ops.compile; the PyTorch backend)
    compile_mode: str = "regional"  # ops.compile.COMPILE_MODES; regional compiles one graph for every block
    # under a launcher: "images" shares the images between the processes; "context" splits every image's tokens
    # across them (ops/parallel.py)
    parallel: str = "images"

    def __post_init__(self):
        check_options(self)  # floats finite, seeds and counts in range (formats/errors.py)
        if self.num_images is not None and self.num_images < 1:
            raise ConfigError(f"--num-images must be >= 1 (got {self.num_images})")
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise ConfigError(f"--steps must be in 1..1000 (got {self.steps})")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.guidance is not None and self.guidance < 0:
            raise ConfigError(f"--guidance must be >= 0 (got {self.guidance})")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise choice_error("sampler", self.sampler, SAMPLERS)
        if self.backend is not None and self.backend not in BACKENDS:
            raise choice_error("backend", self.backend, BACKENDS)
        check_compile_mode(self.compile_mode)
        check_parallel_mode(self.parallel)
        if self.parallel == "context" and self.compile:
            raise ConfigError("--compile and --parallel context do not combine (the split's hooks and collectives "
                              "would break the compiled graphs); choose one")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise ConfigError(f"--{name} must be a positive multiple of 8 (got {v})")
        if self.labels is not None and any(l < 0 for l in self.labels):
            raise ConfigError(f"--labels must be class ids >= 0 (got {self.labels})")



@dataclass
class GenerateReport:
    family: str
    sampler: str
    steps: int
    guidance: float
    seed: int
    height: int
    width: int
    num_images: int
    batch_size: int
    device: str
    dtype: str
    world_size: int
    parallel: str = "images"  # how the processes shared the work (ops/parallel.PARALLEL_MODES)
    context: dict | None = None  # --parallel context under a launcher: the engine, tokens per process, notes
    conditions: list = field(default_factory=list)  # per image: its label or prompt
    seconds: float = 0.0
    images_per_s: float = 0.0
    decoded: bool = True  # False when the bundle has no VAE (latents shown)
    backend: str = "pytorch"  # what ran the transformer: pytorch or onnxruntime
    judge: dict | None = None
    cache: dict | None = None  # the step-caching policy applied (ops.cache), when the bundle has one
    feedback: dict | None = None  # the feedback schedule applied (ops.feedback), when the bundle has one
    compile: dict | None = None  # --compile: applied or why not, the warm-up's seconds and graphs (ops.compile)

    def to_dict(self) -> dict:
        return asdict(self)


def _rows(d: dict | None, idx: list[int], dtype) -> dict | None:
    if d is None:
        return None
    return {k: (v[idx].to(dtype) if v.is_floating_point() else v[idx]) for k, v in d.items()}


def generate(bundle, cfg: GenerateConfig, embeddings=None, progress: Callable[[int], None] | None = None,
             engines: tuple[str, ...] = ENGINES) -> tuple[np.ndarray | None, GenerateReport]:
    """Images (N, H, W, 3) uint8 in index order (None on ranks other than 0 under a launcher). `engines`: those
    `--parallel context` may use (ops/parallel.ENGINES)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    fam, tr = bundle.family, bundle.transformer
    backend = resolve_backend(bundle, cfg.backend)  # an ONNX bundle runs through its OnnxTransformer
    sampler, steps, guidance = settings(bundle, cfg)
    make_scheduler(fam, bundle.scheduler, sampler)  # validates the sampler before any work
    h, w = latent_hw(bundle, cfg.height, cfg.width)
    values, cond, uncond = conditions(bundle, cfg, device, embeddings)
    use_cfg = fam.uses_cfg(tr, guidance)
    if use_cfg and uncond is None:
        raise ConfigError(f"guidance {guidance} needs unconditional embeddings; the embeddings file has no "
                          "negative_* tensors (or pass --guidance 1)")
    n = cfg.num_images or len(values)
    row_of = [i % len(values) for i in range(n)]
    shape = (fam.latent_channels(tr), h, w)

    rank, size = distributed.world()
    split = contextlib.nullcontext()
    context = cfg.parallel == "context" and size > 1
    if context:  # every process runs every image, on its slice of the tokens; rank 0 decodes them
        split, context_note = context_parallel(bundle, (h, w), rank, size, engines)
        mine = list(range(n))
    else:
        mine = distributed.shard(list(range(n)), rank, size)
    make_predict, notes = step_predictor(bundle, sampler, steps, guidance, cache=cfg.cache and not context,
                                         feedback=cfg.feedback and not context)
    if context:
        notes["context"] = context_note
    batch = padded(cfg.batch_size)  # a multiple of the sampler's quantum: pixels never depend on it

    def latents(idx: list[int], n_steps: int) -> torch.Tensor:
        run = idx + idx[-1:] * (padded(len(idx)) - len(idx))  # the last batch padded with a repeat
        rows = [row_of[i] for i in run]
        noise = image_noise(cfg.seed, run, shape).to(device)
        return denoise(fam, tr, make_scheduler(fam, bundle.scheduler, sampler), noise, _rows(cond, rows, dtype),
                       _rows(uncond, rows, dtype) if use_cfg else None, guidance, n_steps,
                       predict=make_predict() if make_predict else None)[:len(idx)]

    compiled = None
    if cfg.compile:  # compiled, then warmed up on the first batch (one step): `seconds` is the steady state
        from .compile import compile_for_run, graph_count

        first = (lambda: latents(mine[:batch], 1)) if mine else None
        compiled, notes["compile"] = compile_for_run(bundle, cfg.compile_mode, device, backend, first,
                                                     lambda: sync(device))
        graphs = graph_count()
    t0 = time.perf_counter()
    out: dict[int, np.ndarray] = {}
    with compiled.active() if compiled is not None else contextlib.nullcontext(), split:
        for start in range(0, len(mine), batch):
            idx = mine[start:start + batch]
            z = latents(idx, steps)
            if not context or rank == 0:
                out.update(zip(idx, decode(bundle.vae, z)))
            if progress is not None:
                progress(len(idx))
    if compiled is not None:  # a graph per new shape (a smaller last batch); never one per step
        notes["compile"]["graphs_after_warmup"] = graph_count() - graphs
    seconds = time.perf_counter() - t0
    parts = ([out] if rank == 0 else None) if context else distributed.gather(out, rank, size)
    images = None
    if parts is not None:
        merged = {k: v for p in parts for k, v in p.items()}
        images = np.stack([merged[i] for i in range(n)])
    report = GenerateReport(
        family=fam.name, sampler=sampler, steps=steps, guidance=guidance, seed=cfg.seed,
        height=h * vae_scale(bundle), width=w * vae_scale(bundle), num_images=n, batch_size=batch,
        device=device, dtype=cfg.dtype, world_size=size, parallel=cfg.parallel, conditions=[values[r] for r in row_of],
        seconds=round(seconds, 4), images_per_s=round(len(mine) / seconds, 3) if seconds else 0.0,
        decoded=bundle.vae is not None, backend=backend, **notes)
    labels = judge_labels(bundle, report.conditions) if images is not None and bundle.judge is not None else None
    if labels is not None:
        from .judge import score

        report.judge = score(bundle.judge, images, labels).to_dict()
    return images, report


def judge_labels(bundle, conditions: list) -> list[int] | None:
    """The judge's class per image: the label itself, or for prompts the one class word each names (the
    bundle's defaults `prompt_labels`, e.g. {"seven": 7}); None when a prompt names no class or several."""
    if bundle.family.conditioning == "class":
        return list(conditions)
    words = bundle.defaults().get("prompt_labels") or {}
    out = []
    for prompt in conditions:
        hits = {v for w, v in words.items() if re.search(rf"(?<!\w){re.escape(w.lower())}(?!\w)", prompt.lower())}
        if len(hits) != 1:
            return None
        out.append(int(hits.pop()))
    return out or None
