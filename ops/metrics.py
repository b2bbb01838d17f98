"""Measurements bench is built from: image similarity (PSNR, SSIM), memory meters, a matmul peak (timers: ops.timing).

Pure functions of tensors/arrays, or of this process's own state (/proc/self); no argv, no printing.
"""
from __future__ import annotations

import ctypes
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .timing import Timer

PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; JSON has no Infinity, so each image is capped here


# -- image similarity --------------------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the per-image PSNR (dB, peak 255) of uint8 (N, H, W, C); each capped at 100 dB."""
    x = torch.from_numpy(np.asarray(a)).double()
    y = torch.from_numpy(np.asarray(b)).double()
    mse = ((x - y) ** 2).flatten(1).mean(1)  # (N,)
    db = 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-300))
    return float(db.clamp(max=PSNR_CAP_DB).mean())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 gaussian window, sigma 1.5, K1 0.01, K2 0.03, peak 255) of uint8
    (N, H, W, C) images, per channel, over the 'valid' window positions; the window shrinks for tiny images."""
    x = torch.from_numpy(np.asarray(a)).double().permute(0, 3, 1, 2)  # (N, C, H, W)
    y = torch.from_numpy(np.asarray(b)).double().permute(0, 3, 1, 2)
    c = x.shape[1]
    size = min(window, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd
    w = _gaussian_window(size, sigma * size / window).expand(c, 1, size, size).contiguous()
    blur = lambda z: F.conv2d(z, w, groups=c)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


# -- memory ------------------------------------------------------------------------------------------

def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_LIBC = None


def _glibc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, see _release_free_memory
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def _release_free_memory() -> bool:
    """Return glibc's free memory to the OS, so that the next call's peak shows in the resident set.

    glibc keeps freed blocks and reuses them without touching new pages, so after a warm-up run the
    resident set barely grows and a peak would read ~0. malloc_trim(0) releases the free pages (they
    fault in again when reused), and a fixed 64 KiB mmap threshold gives every larger block its own
    mapping, returned on free. Used only for the memory pass, after all timing.
    """
    libc = _glibc()
    if not libc:
        return False
    libc.malloc_trim(0)
    return True


def memory_method(device: str) -> str:
    if device.startswith("cuda"):
        return "cuda max_memory_allocated growth + weights"
    return "resident-set growth (/proc/self VmHWM; glibc free memory released first) + weights"


def peak_growth(fn: Callable[[], object], device: str) -> int | None:
    """Bytes of memory the call needs above what was allocated before it (its activations and workspace).

    CUDA: max_memory_allocated - memory_allocated before. CPU: peak resident set (VmHWM, reset first)
    minus the resident set before; None where /proc/self cannot be read or reset.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    _release_free_memory()
    if not _reset_peak_rss():
        fn()
        return None
    before = _proc_status("VmRSS")
    fn()
    peak = _proc_status("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before)


def module_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of the given modules (what their weights occupy in memory)."""
    from ditkit.formats.quantized import is_quantized

    total = 0
    for m in modules:
        if m is None:
            continue
        if is_quantized(m):  # torch.ao keeps its packed int8 weights outside parameters and buffers
            from ditkit.ops.quantize import KINDS
            from ditkit.ops.quantize.base import memory_bytes

            total += memory_bytes(m, KINDS)
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            total += t.numel() * t.element_size()
    return total


# -- the device's dense matmul peak ------------------------------------------------------------------

class MatmulProbe:
    """The device's dense matmul peak: n x n x n matmuls, fp32 n=1024 on CPU, bf16 n=8192 on CUDA.

    Call it to run one matmul; `record` each timing; `peak` is FLOP/s of the best one. bench times it in
    a burst before timing and once in every timing round, so a busy moment cannot set it alone. The best,
    not the median: it asks what this device can reach (model latencies use medians).
    """

    def __init__(self, device: str):
        cuda = device.startswith("cuda")
        self.dtype, self.n = (torch.bfloat16, 8192) if cuda else (torch.float32, 1024)
        self.a = torch.randn(self.n, self.n, device=device, dtype=self.dtype)  # values do not matter
        self.b = torch.randn(self.n, self.n, device=device, dtype=self.dtype)
        self.flops = 2 * self.n ** 3
        self.best_ms = float("inf")
        self.samples = 0

    def __call__(self):
        return self.a @ self.b

    def record(self, ms: float) -> None:
        self.best_ms, self.samples = min(self.best_ms, ms), self.samples + 1

    def burst(self, timer: Callable[[Callable], float], seconds: float = 1.0) -> None:
        timer(self)  # warm-up
        spent = 0.0
        for i in range(50):
            ms = timer(self)
            self.record(ms)
            spent += ms / 1e3
            if i >= 4 and spent > seconds:
                break

    @property
    def peak(self) -> float:
        return self.flops / (self.best_ms / 1e3)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def matmul_peak(device: str, seconds: float = 1.0) -> tuple[float, str, int]:
    """(FLOP/s, dtype, n) of a burst of the probe's matmuls."""
    probe = MatmulProbe(device)
    probe.burst(Timer(device), seconds)
    return probe.peak, probe.dtype_name, probe.n
