"""quantize(bundle, QuantizeConfig) -> (bundle, QuantizeReport): int8, 4-bit and fp8 transformers.

Schemes live in QUANT_SCHEMES; each maps nn.Linear to a quantized *kind* (ditkit.nn.quantized.KINDS: how
a module is made, written as plain tensors, and rebuilt). What is not quantized by the scheme:
  - the family's sensitive layers (Family.is_full_precision: patch and timestep embeddings, label
    tables, the final projection). Those outside the blocks stay fp32. Those inside the blocks are
    per-block copies (diffusers' DiT repeats its timestep MLP and its 1001-row label table in every
    block: 43% of tiny-digits' weights, 10% of DiT-XL/2's): by default they are stored int8
    weight-only (fp32 activations, per-row scales), measured in docs/quantize.md; `--sensitive fp32`
    keeps them all in fp32;
  - `--skip` patterns;
  - the adaLN modulation linears where `--modulation keep` says so (the default, by scheme, was
    chosen by measured error and size: docs/quantize.md);
  - layers whose shape the scheme's kernel cannot take (fp8: multiples of 16).

The input bundle's transformer is quantized in place (a copy of DiT-XL/2 would cost 2.7 GB).
"""
from __future__ import annotations

from typing import ClassVar

import dataclasses
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from ditkit.formats.errors import ConfigError, HardwareError, UnsupportedModelError, check_options, choice_error
from ditkit.formats.quantized import SCHEME_ATTR, is_quantized

from ditkit.nn.quantized import KERNEL_ATTR, KINDS, bnb, fp8, torch_dynamic, weight_only
from ditkit.ops.config import OpConfig

from ..runtime import DTYPES, resolve_device
from . import calibration
from .base import memory_bytes

MODULATION = ("quantize", "keep")
SENSITIVE = ("int8-in-blocks", "fp32")


def _int8_engine(device: str) -> str | None:
    if device.startswith("cuda"):
        return None
    if not ({"x86", "fbgemm", "qnnpack", "onednn"} & set(torch.backends.quantized.supported_engines)):
        return "this PyTorch build has no quantized CPU engine (fbgemm/x86/qnnpack) for int8-dynamic"
    return None


@dataclass(frozen=True)
class Scheme:
    name: str
    linear: str  # KINDS key for nn.Linear
    modulation: str  # default for adaLN modulation linears, measured on tiny-digits (docs/quantize.md)
    doc: str
    opts: dict = field(default_factory=dict)
    compute_dtypes: tuple[str, ...] = ()  # allowed --compute-dtype values; empty: the option does not apply
    hardware: Callable[[str], str | None] | None = None  # device -> why it cannot run, or None
    fits: Callable[[nn.Linear], bool] | None = None  # a kernel's shape rule; layers failing it stay float


QUANT_SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("int8-dynamic", torch_dynamic.KIND, "quantize",
           "int8 weights and dynamic int8 activations: torch.ao fbgemm on CPU, torch._int_mm on CUDA",
           hardware=_int8_engine),
    Scheme("int8-weight-only", weight_only.LINEAR, "quantize",
           "int8 weights, float activations (saves memory, not time)", compute_dtypes=("fp32", "bf16", "fp16")),
    Scheme("bnb-int8", bnb.INT8, "quantize",
           "bitsandbytes LLM.int8() (int8 with fp16 outliers)"),
    Scheme("bnb-nf4", bnb.LINEAR4, "quantize",
           "bitsandbytes 4-bit NormalFloat weights", {"quant_type": "nf4"}, ("fp32", "bf16", "fp16")),
    Scheme("bnb-fp4", bnb.LINEAR4, "quantize",
           "bitsandbytes 4-bit float weights", {"quant_type": "fp4"}, ("fp32", "bf16", "fp16")),
    Scheme("fp8", fp8.KIND, "quantize",
           "float8 e4m3 weights and activations via torch._scaled_mm (CUDA, compute capability >= 8.9)",
           compute_dtypes=("bf16", "fp16", "fp32"), hardware=fp8.check_device, fits=fp8.fits),
)}


@dataclass
class QuantizeConfig(OpConfig):
    TYPE: ClassVar[str] = "quantize"

    scheme: str = "int8-dynamic"  # the fastest CPU int8 path measured here (docs/quantize.md)
    skip: list[str] = field(default_factory=list)  # extra module-name regexes kept in full precision
    modulation: str | None = None  # "quantize" or "keep" the adaLN modulation linears; None: scheme default
    sensitive: str = "int8-in-blocks"  # per-block copies of sensitive layers int8 weight-only (43% of tiny-digits)
    compute_dtype: str | None = None  # 4-bit / weight-only / fp8 matmul dtype; None: the scheme's default
    device: str = "cpu"
    calib_batches: int = 4  # calibration: batches x batch_size samples, seeds seed.., timesteps spread
    calib_batch_size: int = 2
    seed: int = 0

    def __post_init__(self):
        check_options(self)  # floats finite, seeds and counts in range (formats/errors.py)
        if self.scheme not in QUANT_SCHEMES:
            raise choice_error("scheme", self.scheme, QUANT_SCHEMES)
        for p in self.skip:
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"--skip {p!r} is not a valid regular expression ({e}); e.g. --skip 'attn1\\.to_out'")
        if self.modulation is not None and self.modulation not in MODULATION:
            raise choice_error("--modulation", self.modulation, MODULATION)
        if self.sensitive not in SENSITIVE:
            raise choice_error("--sensitive", self.sensitive, SENSITIVE)
        if self.compute_dtype is not None:
            allowed = QUANT_SCHEMES[self.scheme].compute_dtypes
            if not allowed:
                raise ConfigError(f"--compute-dtype does not apply to {self.scheme} (its kernel fixes the arithmetic); "
                                  f"drop it, or use a scheme that takes it: "
                                  f"{', '.join(n for n, s in QUANT_SCHEMES.items() if s.compute_dtypes)}")
            if self.compute_dtype not in allowed:
                raise choice_error(f"--compute-dtype for {self.scheme}", self.compute_dtype, allowed)
        for name in ("calib_batches", "calib_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")



@dataclass
class QuantizeReport:
    scheme: str
    device: str
    compute_dtype: str | None
    modulation: str  # "quantize" or "keep", as applied
    sensitive: str  # "int8-in-blocks" or "fp32", as applied
    layers_quantized: int
    layers_full_precision: int
    params_total: int
    params_quantized: int
    memory_bytes_before: int
    memory_bytes_after: int
    memory_ratio: float
    disk_bytes_before: int  # the source's transformer safetensors
    disk_bytes_after: int | None = None  # the output's transformer safetensors (set once written)
    disk_ratio: float | None = None
    sqnr_db: float | None = None  # whole transformer output vs the float model, calibration set
    sqnr_db_min_layer: float | None = None
    worst_layer: str | None = None
    kernels: dict = field(default_factory=dict)  # quantized module class (+ " (engine)") -> {kind, count, kernel}
    layers: list = field(default_factory=list)  # per quantized layer: name, kind, params, sqnr_db
    full_precision: list = field(default_factory=list)  # per kept Linear/Embedding: name, params, reason
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0
    lora: dict | None = None  # --lora: the adapters fused before quantizing and each step's error (quantize_fused)

    def set_disk_after(self, n: int) -> None:
        self.disk_bytes_after = int(n)
        self.disk_ratio = round(n / self.disk_bytes_before, 4) if self.disk_bytes_before else None

    def to_dict(self) -> dict:
        return asdict(self)


def _db(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else round(x, 2)


def check_hardware(cfg: QuantizeConfig) -> str:
    """The resolved device, or HardwareError naming why this scheme cannot run on it."""
    device = resolve_device(cfg.device)
    scheme = QUANT_SCHEMES[cfg.scheme]
    why = scheme.hardware(device) if scheme.hardware else None
    if why:
        raise HardwareError(why)
    return device


def plan(family, transformer, cfg: QuantizeConfig) -> tuple[list[tuple[str, nn.Module, str, str]], list[dict]]:
    """(targets as (name, module, kind, role), kept layers as {name, type, params, reason}).

    role: "scheme" (quantized by the scheme) or "sensitive" (a per-block copy of a sensitive layer,
    stored int8 weight-only)."""
    scheme = QUANT_SCHEMES[cfg.scheme]
    modulation = cfg.modulation or scheme.modulation
    in_blocks = family.blocks_attr + "."
    targets, kept = [], []
    for name, m in transformer.named_modules():
        if type(m) not in (nn.Linear, nn.Embedding):  # exact types: wrappers (peft LoRA) are refused earlier
            continue
        linear = isinstance(m, nn.Linear)
        reason, kind, role = None, None, "scheme"
        skip = next((p for p in cfg.skip if re.search(p, name)), None)
        if skip is not None:
            reason = f"--skip {skip}"
        elif family.is_full_precision(name):
            if cfg.sensitive == "int8-in-blocks" and name.startswith(in_blocks) and getattr(m, "max_norm", None) is None:
                kind, role = (weight_only.LINEAR if linear else weight_only.EMBEDDING), "sensitive"
            else:
                reason = f"{family.name} family: sensitive layer"
        elif not linear:
            kind = weight_only.EMBEDDING if m.max_norm is None else None
            reason = None if kind else "embedding with max_norm"
        elif modulation == "keep" and family.is_modulation(name):
            reason = "adaLN modulation (--modulation keep)"
        elif scheme.fits is not None and not scheme.fits(m):
            reason = f"shape {m.out_features}x{m.in_features} does not fit the {cfg.scheme} kernel"
        else:
            kind = scheme.linear
        if reason is None:
            targets.append((name, m, kind, role))
        else:
            kept.append({"name": name, "type": type(m).__name__, "params": sum(p.numel() for p in m.parameters()),
                         "reason": reason})
    return targets, kept


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize(bundle, cfg: QuantizeConfig, progress: Callable[[str], None] | None = None):
    """Quantize bundle.transformer in place; returns (a bundle holding it, QuantizeReport)."""
    t0 = time.perf_counter()
    device = check_hardware(cfg)
    from ditkit.ops.feedback import refuse

    refuse(bundle, "ditkit quantize")
    fam, tr = bundle.family, bundle.transformer
    if is_quantized(tr):
        raise UnsupportedModelError(f"{bundle.name} is already quantized ({getattr(tr, SCHEME_ATTR, {}).get('scheme')}); "
                                    "quantize its full-precision parent instead")
    if any(hasattr(m, "base_layer") for m in tr.modules()):
        raise UnsupportedModelError(f"{bundle.name} holds unfused LoRA layers; fuse the LoRA first, then quantize")
    scheme = QUANT_SCHEMES[cfg.scheme]
    opts = {**scheme.opts, "compute_dtype": cfg.compute_dtype}
    note = progress or (lambda msg: None)

    # 1. What to quantize
    targets, kept = plan(fam, tr, cfg)
    if not targets:
        raise ConfigError(f"nothing to quantize: every Linear/Embedding of {bundle.name} is kept in full precision "
                          "(check --skip)")
    params_total = sum(p.numel() for p in tr.parameters())
    mem_before = memory_bytes(tr, KINDS)

    # 2. Quantized copies of each target (the float ones stay in place for the reference pass)
    note(f"quantizing {len(targets)} layers ({cfg.scheme})")
    qmods = {name: KINDS[kind].make(m, device, {**opts, "conditioning": fam.is_modulation(name),
                                                **({"role": role} if role == "sensitive" else {})})
             .eval().requires_grad_(False) for name, m, kind, role in targets}  # eval: bnb picks its path by mode

    # 3. Float reference on the calibration set; each quantized layer's error on its float inputs
    note("calibrating")
    calib = calibration.calibration_set(fam, tr, cfg.calib_batches, cfg.calib_batch_size, cfg.seed)
    ref, layer_energy = calibration.reference_and_layer_error(fam, tr, calib, qmods)

    # 4. Swap in the quantized modules; whole-output error
    for name, m in qmods.items():
        _swap(tr, name, m)
    setattr(tr, SCHEME_ATTR, {"scheme": cfg.scheme, "compute_dtype": cfg.compute_dtype,
                              "modulation": cfg.modulation or scheme.modulation, "sensitive": cfg.sensitive})
    out_energy = calibration.output_error(ref, calibration.outputs(fam, tr, calib))

    # 5. Report
    kernels: dict[str, dict] = {}
    layers = []
    for name, m, kind, role in targets:
        q = qmods[name]
        engine = q.ditkit_spec.get("engine")  # int8-dynamic on CPU: the backend its weight is packed for
        key = q._get_name() + (f" ({engine})" if engine else "")
        k = kernels.setdefault(key, {"kind": kind, "count": 0, "kernel": getattr(q, KERNEL_ATTR)})
        k["count"] += 1
        layers.append({"name": name, "kind": kind, "role": role, "params": sum(p.numel() for p in m.parameters()),
                       "sqnr_db": _db(layer_energy[name].db)})
    finite = [l for l in layers if l["sqnr_db"] is not None]
    worst = min(finite, key=lambda l: l["sqnr_db"]) if finite else None
    mem_after = memory_bytes(tr, KINDS)
    x0 = calib[0][0]
    report = QuantizeReport(
        scheme=cfg.scheme, device=device, compute_dtype=cfg.compute_dtype,
        modulation=cfg.modulation or scheme.modulation, sensitive=cfg.sensitive, layers_quantized=len(targets), layers_full_precision=len(kept),
        params_total=params_total, params_quantized=sum(l["params"] for l in layers),
        memory_bytes_before=mem_before, memory_bytes_after=mem_after, memory_ratio=round(mem_after / mem_before, 4),
        disk_bytes_before=bundle.transformer_bytes_on_disk(),
        sqnr_db=_db(out_energy.db), sqnr_db_min_layer=worst["sqnr_db"] if worst else None,
        worst_layer=worst["name"] if worst else None, kernels=kernels, layers=layers, full_precision=kept,
        calibration={"samples": sum(c[0].shape[0] for c in calib), "batches": cfg.calib_batches,
                     "batch_size": cfg.calib_batch_size, "seeds": [cfg.seed + b for b in range(cfg.calib_batches)],
                     "timesteps": [int(v) for c in calib for v in c[1].tolist()],
                     "latent_shape": list(x0.shape[1:]), "inputs": "family.dummy_inputs (unit Gaussian latents)"},
        seconds=round(time.perf_counter() - t0, 3))
    out = dataclasses.replace(bundle, transformer=tr, path=None,
                              manifest={"op": "quantize", "defaults": bundle.manifest.get("defaults", {})})
    return out, report


def quantize_fused(bundle, cfg: QuantizeConfig, adapters: list, scales: list[float],
                   progress: Callable[[str], None] | None = None):
    """--lora: fuse the adapters into the float weights, then quantize; the report's `lora` gives each step's error.

    On the calibration set: fuse_sqnr_db is the fused float model against the base with the adapters applied
    unfused (peft: x W + s B A x), quantize_sqnr_db the quantized model against the fused float one (the
    report's sqnr_db), total_sqnr_db the quantized model against the unfused reference. Fused in place: no
    copy of the transformer."""
    from ditkit.ops.lora import adapter_scales, apply_lora, fuse_lora_, unload_lora

    fam, tr = bundle.family, bundle.transformer
    if is_quantized(tr):
        raise UnsupportedModelError(f"{bundle.name} is already quantized; --lora fuses into the float model: "
                                    "give its full-precision parent")
    scales = adapter_scales(scales, len(adapters))
    note = progress or (lambda msg: None)
    note(f"fusing {len(adapters)} LoRA adapter(s)")
    calib = calibration.calibration_set(fam, tr, cfg.calib_batches, cfg.calib_batch_size, cfg.seed)
    apply_lora(bundle, adapters, scales)  # 1. the reference: the adapters beside the float weights
    unfused = calibration.outputs(fam, tr, calib)
    unload_lora(bundle)
    fuse_lora_(bundle, adapters, scales)  # 2. fused: W + s (alpha / rank) B A
    fuse_err = calibration.output_error(unfused, calibration.outputs(fam, tr, calib))
    out, report = quantize(bundle, cfg, progress)  # 3. quantized against the fused float model
    total = calibration.output_error(unfused, calibration.outputs(fam, out.transformer, calib))
    report.lora = {"adapters": [{**a.summary(), "scale": s} for a, s in zip(adapters, scales)],
                   "fuse_sqnr_db": _db(fuse_err.db), "quantize_sqnr_db": report.sqnr_db,
                   "total_sqnr_db": _db(total.db)}
    return out, report


__all__ = ["KINDS", "QUANT_SCHEMES", "QuantizeConfig", "QuantizeReport", "Scheme", "check_hardware", "plan", "quantize", "quantize_fused"]
