"""Peak-memory estimates, and the check that refuses a job which clearly cannot fit before it allocates.

Commands call it twice: `check(load_estimate(...))` before loading (the weights, counted from the
safetensors headers at the dtype they will be cast to), then `check(...)` with the op's own estimate
(activations, optimizer state, pools) once the weights are in memory. The comparison is with the memory
free right now: MemAvailable (or the cgroup limit minus usage, when lower) on CPU,
torch.cuda.mem_get_info on CUDA. `--force` skips the refusal (the estimate is still printed).

The inference estimate is deliberately simple and on the high side (docs/reliability.md):
  transformer: rows x tokens x hidden x bytes x 16 (what one block keeps alive: residual, norms, q/k/v,
               attention output, the 4x MLP before and after its activation); rows = 2 x batch (guidance),
               attention itself is O(tokens) with PyTorch's SDPA kernels, so no tokens^2 term;
  VAE decode:  BATCH_QUANTUM images x the largest decoder level (pixels at that level x its channels) x
               bytes x 8.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ditkit.formats.errors import HardwareError

ACT_FACTOR = 16  # live tensors per block, in units of rows x tokens x hidden
VAE_FACTOR = 8  # live tensors of a decoder level, in units of its feature map


def describe(n: int | float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class Estimate:
    what: str  # "generate", "loading tiny-digits", ...
    parts: dict[str, int] = field(default_factory=dict)  # bytes by kind
    allocated: int = 0  # bytes of `parts` already in memory (loaded weights): not compared with the free memory
    hint: str = "use a smaller model or batch"

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def to_allocate(self) -> int:
        return max(self.total - self.allocated, 0)

    def to_dict(self) -> dict:
        return {"what": self.what, "total_bytes": self.total, "to_allocate_bytes": self.to_allocate,
                "parts_bytes": dict(self.parts)}


# -- what is free ------------------------------------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _cgroup_free() -> int | None:
    """limit - usage of this process's cgroup (v2, else v1), or None when unlimited/unknown."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read(limit_f), _read(usage_f)
        if limit is None or usage is None or limit.strip() == "max":
            continue
        try:
            lim, use = int(limit), int(usage)
        except ValueError:
            continue
        if lim < 1 << 60:  # v1 reports "unlimited" as a huge number
            return max(lim - use, 0)
    return None


def cpu_available() -> int | None:
    avail = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        text = _read("/proc/meminfo") or ""
        for line in text.splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    cg = _cgroup_free()
    if cg is not None:
        avail = cg if avail is None else min(avail, cg)
    return avail


def available_bytes(device: str) -> int | None:
    """Memory free for this job on `device` now, or None when it cannot be told."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return cpu_available()


# -- estimates ---------------------------------------------------------------------------------------------

def load_estimate(*srcs, dtype: torch.dtype = torch.float32) -> Estimate:
    """The weights checkpoints will take once loaded (from their headers; nothing else is read)."""
    from ditkit.formats.layouts import resolve_source
    from ditkit.formats.safetensors_check import checkpoint_bytes

    paths = [resolve_source(s) for s in srcs]
    size = torch.empty((), dtype=dtype).element_size()
    names = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return Estimate(f"loading {names}", {"weights": sum(checkpoint_bytes(p, size) for p in paths)},
                    hint="use a machine with more memory, or a smaller --dtype on CUDA")


def module_bytes(bundle) -> int:
    mods = [bundle.transformer, *bundle.components.values()]
    return int(sum(t.numel() * t.element_size() for m in mods if isinstance(m, torch.nn.Module)
                   for t in (*m.parameters(), *m.buffers())))


def transformer_activations(bundle, rows: int, hw: tuple[int, int]) -> int:
    """rows x tokens x hidden x bytes x ACT_FACTOR (0 when the transformer does not say its width)."""
    tr, fam = bundle.transformer, bundle.family
    try:
        width = fam.hidden_size(tr)  # the family adapter says where its config keeps D
    except (AttributeError, TypeError):  # an ONNX session or a config without it
        return 0
    tokens = fam.image_tokens(tr, hw)
    param = next(tr.parameters(), None) if isinstance(tr, torch.nn.Module) else None
    size = param.element_size() if param is not None and param.is_floating_point() else 4
    return int(rows * tokens * width * size * ACT_FACTOR)


def vae_activations(bundle, hw: tuple[int, int], scale: int) -> int:
    from .sample import BATCH_QUANTUM

    vae = bundle.vae
    c = getattr(vae, "config", None)  # AutoencoderKL: block_out_channels; DC-AE: decoder_block_out_channels
    chans = list(getattr(c, "block_out_channels", None) or getattr(c, "decoder_block_out_channels", None) or [])
    if not chans:
        return 0
    size = next(vae.parameters()).element_size()
    pixels = hw[0] * scale * hw[1] * scale
    level = max(ch * pixels // 4 ** i for i, ch in enumerate(chans))
    return int(BATCH_QUANTUM * level * size * VAE_FACTOR)


def inference_estimate(what: str, bundles: list, batch: int, height: int | None = None,
                       width: int | None = None) -> Estimate:
    """Loaded weights of every bundle + the activations of the largest one at `batch` images."""
    from .geometry import latent_hw, vae_scale
    from .sample import padded

    weights = sum(module_bytes(b) for b in bundles)
    rows = 2 * padded(batch)  # classifier-free guidance doubles the rows
    acts = max(transformer_activations(b, rows, latent_hw(b, height, width)) for b in bundles)
    vae = max(vae_activations(b, latent_hw(b, height, width), vae_scale(b)) for b in bundles)
    return Estimate(what, {"weights": weights, "transformer activations": acts, "VAE decode": vae},
                    allocated=weights, hint="use a smaller --batch-size or resolution")


def check(est: Estimate, device: str, force: bool = False, log=None) -> dict:
    """Refuse (HardwareError, exit 2) when what is still to be allocated exceeds the free memory; --force
    (force=True) only logs. Returns the record for reports."""
    free = available_bytes(device)
    rec = {**est.to_dict(), "available_bytes": free, "device": device}
    if free is None or est.to_allocate <= free:
        return rec
    parts = ", ".join(f"{k} {describe(v)}" for k, v in est.parts.items() if v)
    msg = (f"{est.what} needs about {describe(est.total)} ({parts}); {describe(est.to_allocate)} of it is still "
           f"to be allocated but only {describe(free)} is available on {device}")
    if force:
        if log is not None:
            log(f"warning: {msg}; going on because of --force")
        return rec
    raise HardwareError(f"{msg}; {est.hint}, or pass --force to try anyway")
