"""ditkit bench: time and judge variants against their base, side by side, with quality gates for CI."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from ditkit.formats.atomic import check_output
from ditkit.formats.layouts import load_bundle
from ditkit.formats.embeddings import load_embeddings
from ditkit.formats.errors import ConfigError, QualityGateError
from ditkit.ops import distributed, memory
from ditkit.ops.bench import BenchConfig, bench, describe_failures
from ditkit.ops.runtime import resolve_device, resolve_dtype

from . import bench_render, output
from .generate import parse_ints, read_prompts
from .options import ConfigOpt, DeviceOpt, DtypeOpt, FamilyOpt, ForceOpt, JsonOpt, SeedOpt

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # the current stderr (output.err keeps the one it was built with)


def bench_cmd(
    models: Annotated[Optional[list[str]], typer.Argument(
        help="BASE then VARIANTs: pipeline or bare transformer directories, .safetensors/.pt files, or an "
             "embedded model name (default: tiny-digits).", show_default=False)] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes, e.g. 1,8; the first is the headline.")] = "1",
    steps: Annotated[Optional[int], typer.Option(help="End-to-end steps for every model (default: each its own).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="Sampler for every model (default: each its own).")] = None,
    num_images: Annotated[int, typer.Option(help="Quality images per model, on identical seeds; 0 skips quality.")] = 100,
    labels: Annotated[Optional[str], typer.Option(help="Class ids, comma-separated (dit).")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(help="A prompt (repeatable; text families).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="A file with one prompt per line.")] = None,
    embeddings: Annotated[Optional[Path], typer.Option(help="Precomputed text embeddings (.safetensors).")] = None,
    seed: SeedOpt = 0,
    warmup: Annotated[int, typer.Option(help="Untimed interleaved rounds before the per-step repeats.")] = 3,
    repeats: Annotated[int, typer.Option(help="Timed per-step rounds (median and p90).")] = 20,
    image_repeats: Annotated[int, typer.Option(help="Timed end-to-end rounds after one warm-up; 0 skips them.")] = 10,
    quality_batch_size: Annotated[int, typer.Option(help="Images per batch when generating quality images.")] = 25,
    min_speedup: Annotated[Optional[float], typer.Option(
        help="Gate: every variant's speedup_per_image (per step for bare transformers) >= X.")] = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option(
        help="Gate: base judge accuracy - variant judge accuracy <= D (needs a judge).")] = None,
    max_fd_ratio: Annotated[Optional[float], typer.Option(
        help="Gate: variant judge FD / base judge FD <= R (needs a judge).")] = None,
    min_psnr: Annotated[Optional[float], typer.Option(help="Gate: PSNR of each variant's images vs the base's >= P dB.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's own).")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    json_: JsonOpt = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print markdown tables (docs, PR comments).")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Write a quality-vs-speed plot (PNG).")] = None,
    force: ForceOpt = False,
):
    """Time base and variants interleaved in one process; compare their images on identical seeds; gate.

    Exits 1 (after printing the full report) when any variant misses a --min-*/--max-* gate.
    """
    if json_ and markdown:
        raise ConfigError("--json and --markdown both print the report on stdout; choose one")
    cfg = BenchConfig(batch_sizes=parse_ints(batch_sizes, "--batch-sizes") or [], steps=steps, sampler=sampler,
                      num_images=num_images, labels=parse_ints(labels, "--labels"),
                      prompts=read_prompts(prompt or [], prompts_file), seed=seed, quality_batch_size=quality_batch_size,
                      warmup=warmup, repeats=repeats, image_repeats=image_repeats, device=resolve_device(device),
                      dtype=dtype, min_speedup=min_speedup, max_accuracy_drop=max_accuracy_drop,
                      max_fd_ratio=max_fd_ratio, min_psnr=min_psnr)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1 (got {threads})")
    if plot is not None and distributed.world()[0] == 0:
        check_output(plot, force)
    torch_dtype = resolve_dtype(dtype, cfg.device)
    memory.check(memory.load_estimate(*(models or [None]), dtype=torch_dtype), cfg.device, force, log)
    bundles = [load_bundle(m, family=family, config=config, device=cfg.device, dtype=torch_dtype)
               for m in (models or [None])]
    biggest = max(cfg.batch_sizes + ([min(cfg.quality_batch_size, cfg.num_images)] if cfg.num_images else []))
    memory.check(memory.inference_estimate("bench", bundles, biggest), cfg.device, force, log)
    emb = load_embeddings(embeddings) if embeddings else None
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or threads_before)
        with distributed.process_group(cfg.device):
            _, report = bench(bundles, cfg, emb, log=log)
    finally:
        torch.set_num_threads(threads_before)
    if report is None:
        return  # not rank 0: rank 0 times and reports
    doc = report.to_dict()
    if json_:
        output.print_json(doc)
    elif markdown:
        print(bench_render.markdown(doc))
    else:
        bench_render.print_tables(doc)
    if plot is not None:
        bench_render.plot(doc, plot)
        log(f"plot -> {plot}")
    if not report.passed:
        raise QualityGateError(describe_failures(report))
