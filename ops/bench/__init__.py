"""bench(bundles, BenchConfig) -> (bundles, BenchReport): time and judge variants against their base.

What is measured, for each model (bundles[0] is the base), in one process:
  1. quality: images from every model that has a VAE, on the same labels/prompts and per-image seeds
     (ops.generate, sharded across processes under a launcher), compared with the base's: PSNR, SSIM,
     and, with a judge (the base's, else the first variant's), class accuracy and Frechet distance;
  2. per-step latency: one transformer call on the rows a sampler step needs for B images (2B with
     classifier-free guidance, B without: the same call the end-to-end loop makes), at every batch size;
  3. end-to-end latency: denoise + decode of B images at the model's own sampler and step count;
  4. peak memory, FLOPs of the timed call (ops.flops, attention included), and the device's dense matmul peak.
Timing interleaves the models (A B, then B A, ...) after warm-up rounds, so the drift of a shared
machine hits them alike; figures are medians with p90. Only rank 0 times; other ranks return None.
"""
from __future__ import annotations

from .driver import STEP_SAMPLE_MS, bench
from .gates import describe_failures
from .kernels import kernels
from .report import GATES, BatchResult, BenchConfig, BenchReport, Gate, ModelResult, Quality

__all__ = ["GATES", "STEP_SAMPLE_MS", "BatchResult", "BenchConfig", "BenchReport", "Gate", "ModelResult", "Quality",
           "bench", "describe_failures", "kernels"]
