"""Device and dtype choices shared by every op (one registry, one validation)."""
from __future__ import annotations

import torch

from ditkit.formats.errors import ConfigError, HardwareError, choice_error

from ditkit.nn.dtypes import DTYPES  # the names --dtype accepts (one table, shared with ditkit.nn.quantized)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise HardwareError(f"--device {device}: no CUDA device is available here; use --device cpu")
        return device
    if device != "cpu":
        raise ConfigError(f"unknown device {device!r}, choose one of: auto, cpu, cuda, cuda:N")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise choice_error("dtype", dtype, DTYPES)
    if dtype != "fp32" and not device.startswith("cuda"):
        raise ConfigError(f"--dtype {dtype} is for CUDA devices; on {device} use --dtype fp32")
    return DTYPES[dtype]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def image_speedup(bundle, noise, cond: dict, uncond: dict | None, sampler: str, steps: int, guidance: float,
                  make_predict, repeats: int) -> float:
    """One image's denoise + decode at (sampler, steps, guidance) without and with `make_predict()` replacing the
    transformer call, in process CPU time on one thread (interleaved medians): bench's per-image figure, as the
    calibrating ops (cache, distill --mode feedback) check their choice."""
    from .sample import decode, denoise, make_scheduler
    from .timing import cpu_ms

    fam, tr = bundle.family, bundle.transformer

    def image(predict):
        sched = make_scheduler(fam, bundle.scheduler, sampler)
        return decode(bundle.vae, denoise(fam, tr, sched, noise, cond, uncond, guidance, steps, predict=predict))
    med = cpu_ms({"plain": lambda: image(None), "fast": lambda: image(make_predict())}, repeats)
    return med["plain"] / max(med["fast"], 1e-9)
