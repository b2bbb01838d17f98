"""bench's config and report types: BenchConfig (with its gates), per batch size, per model, per gate, the whole."""
from __future__ import annotations

from typing import ClassVar

import math
from dataclasses import asdict, dataclass, field

from ditkit.formats.errors import ConfigError, check_options, choice_error
from ditkit.ops.config import OpConfig

from ..image_metrics import METRIC_GATES, check_metrics
from ..compile import check_mode as check_compile_mode
from ..parallel import check_mode as check_parallel_mode
from ..runtime import resolve_device, resolve_dtype
from ..sample import SAMPLERS


GATES = {  # gate name -> (metric it reads, comparison): every variant must pass
    "min_speedup": ("speedup_per_image (speedup_per_step for bare transformers)", ">="),
    "max_accuracy_drop": ("base judge_accuracy - variant judge_accuracy", "<="),
    "max_fd_ratio": ("variant judge_fd / base judge_fd", "<="),
    "min_psnr": ("psnr vs base (dB)", ">="),
    **{g: (f"{m}{' / base ' + m if kind == 'ratio' else ''}", op) for g, (m, kind, op) in METRIC_GATES.items()},
}


@dataclass
class BenchConfig(OpConfig):
    TYPE: ClassVar[str] = "bench"

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
    metrics: dict = field(default_factory=dict)  # --metric NAME[=PATH]: name -> weights path (None: default place)
    fid_reference: str | None = None  # a folder of reference images for fid/kid; default: the base's own images
    min_clip: float | None = None
    min_clip_ratio: float | None = None
    max_fid: float | None = None
    max_fid_ratio: float | None = None
    max_kid: float | None = None
    max_kid_ratio: float | None = None
    max_lpips: float | None = None
    compile: bool = False  # also time every model torch.compiled (ops.compile), interleaved with its eager calls
    compile_mode: str = "regional"  # ops.compile.COMPILE_MODES
    # under a launcher: "images" shares the quality images between the processes; "context" splits every image's
    # tokens across them and times that too (ops/parallel.py)
    parallel: str = "images"
    cache: bool = True  # apply each bundle's step-caching policy (ditkit cache) where it fits; --no-cache: off

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
        check_metrics(self.metrics)
        if self.fid_reference is not None and not {"fid", "kid"} & set(self.metrics):
            raise ConfigError("--fid-reference is the reference set of --metric fid / kid; add --metric fid")
        for gate, (metric, kind, _) in METRIC_GATES.items():
            if getattr(self, gate) is None:
                continue
            if metric not in self.metrics:
                raise ConfigError(f"--{gate.replace('_', '-')} gates on {metric}: add --metric {metric}")
            if kind == "ratio" and metric in ("fid", "kid") and self.fid_reference is None:
                raise ConfigError(f"--{gate.replace('_', '-')} divides by the base's {metric} to the reference, "
                                  f"which is 0 for FID/KID to base: give --fid-reference DIR, or gate with "
                                  f"--max-{metric} instead")
        check_compile_mode(self.compile_mode)
        check_parallel_mode(self.parallel)
        if self.parallel == "context" and self.compile:
            raise ConfigError("--compile and --parallel context do not combine (the split's hooks and collectives "
                              "would break the compiled graphs); choose one")

    def gates(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in GATES if getattr(self, k) is not None}



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
    metrics: dict | None = None  # --metric name -> value (ops/image_metrics.py)
    metric_ratios: dict | None = None  # name -> value / the base's (None where the base's is 0: FID to base, LPIPS)
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
    weights_bytes: int | None = None  # in memory; quantized tensors by their storage (ops/peers.weights_bytes)
    sqnr_db_step: float | None = None  # the timed step's output vs the base's, headline batch size


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
    compile: dict | None = None  # --compile: per model, compile time and speedups compiled and not (ops/bench/compiled)
    context: dict | None = None  # --parallel context under a launcher: per model, latency split across the processes

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
