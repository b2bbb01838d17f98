"""ditkit bench: time and judge variants against their base, side by side, with quality gates for CI."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditkit.formats.errors import ConfigError, QualityGateError

from .options import (CompileModeOpt, CompileOpt, ConfigOpt, DeviceOpt, DtypeOpt, EmbeddingsOpt, FamilyOpt, ForceOpt, JsonOpt, LabelsOpt,
                      NoCacheOpt, ParallelOpt, PromptOpt, PromptsFileOpt, SeedOpt, ThreadsOpt, parse_ints, read_prompts)
from .run import Common, Run, log, note_no_policy, run_op


def bench_cmd(
    models: Annotated[Optional[list[str]], typer.Argument(
        help="BASE then VARIANTs: pipeline or bare transformer directories, .safetensors/.pt files, or an "
             "embedded model name (default: tiny-digits).", show_default=False)] = None,
    peer: Annotated[Optional[list[str]], typer.Option(
        help="Also bench BASE quantized in-process by another library (repeatable): torchao-int8-dynamic, "
             "torchao-int8-weight-only, torchao-int4-weight-only, quanto-qint8, quanto-qfloat8, gguf-Q8_0, "
             "gguf-Q4_K (ditkit.ops.peers).", show_default=False)] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes, e.g. 1,8; the first is the headline.")] = "1",
    steps: Annotated[Optional[int], typer.Option(help="End-to-end steps for every model (default: each its own).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="Sampler for every model (default: each its own).")] = None,
    num_images: Annotated[int, typer.Option(help="Quality images per model, on identical seeds; 0 skips quality.")] = 100,
    labels: LabelsOpt = None,
    prompt: PromptOpt = None,
    prompts_file: PromptsFileOpt = None,
    embeddings: EmbeddingsOpt = None,
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
    metric: Annotated[Optional[list[str]], typer.Option(
        "--metric", help="A quality metric, NAME or NAME=PATH (repeatable): clip=DIR (a local CLIP model), fid, kid, "
                         "lpips (PATH: their weights file or its folder; default: torch hub's checkpoints folder). "
                         "See docs/bench.md.", show_default=False)] = None,
    fid_reference: Annotated[Optional[Path], typer.Option(
        help="A folder of reference images for --metric fid/kid (default: the base's own images, 'FID to base').",
        show_default=False)] = None,
    min_clip: Annotated[Optional[float], typer.Option(help="Gate: each variant's CLIP score >= S.")] = None,
    min_clip_ratio: Annotated[Optional[float], typer.Option(help="Gate: variant CLIP score / base CLIP score >= R.")] = None,
    max_fid: Annotated[Optional[float], typer.Option(help="Gate: each variant's FID (to base, or --fid-reference) <= F.")] = None,
    max_fid_ratio: Annotated[Optional[float], typer.Option(
        help="Gate: variant FID / base FID to --fid-reference <= R.")] = None,
    max_kid: Annotated[Optional[float], typer.Option(help="Gate: each variant's KID (to base, or --fid-reference) <= K.")] = None,
    max_kid_ratio: Annotated[Optional[float], typer.Option(
        help="Gate: variant KID / base KID to --fid-reference <= R.")] = None,
    max_lpips: Annotated[Optional[float], typer.Option(help="Gate: each variant's LPIPS vs the base's images <= L.")] = None,
    no_cache: NoCacheOpt = False,
    compile_: CompileOpt = False,
    compile_mode: CompileModeOpt = "regional",
    parallel: ParallelOpt = "images",
    threads: ThreadsOpt = None,
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
    from ditkit.ops.bench import BenchConfig
    from ditkit.ops.image_metrics import parse_metrics
    from ditkit.ops.runtime import resolve_device

    if peer:
        from ditkit.formats.errors import choice_error
        from ditkit.ops.peers import PEERS

        bad = next((p for p in peer if p not in PEERS), None)
        if bad is not None:
            raise choice_error("--peer", bad, PEERS)
    if json_ and markdown:
        raise ConfigError("--json and --markdown both print the report on stdout; choose one")
    cfg = BenchConfig(batch_sizes=parse_ints(batch_sizes, "--batch-sizes") or [], steps=steps, sampler=sampler,
                      num_images=num_images, labels=parse_ints(labels, "--labels"),
                      prompts=read_prompts(prompt or [], prompts_file), seed=seed, quality_batch_size=quality_batch_size,
                      warmup=warmup, repeats=repeats, image_repeats=image_repeats, device=resolve_device(device),
                      dtype=dtype, min_speedup=min_speedup, max_accuracy_drop=max_accuracy_drop,
                      max_fd_ratio=max_fd_ratio, min_psnr=min_psnr, metrics=parse_metrics(metric or []),
                      fid_reference=str(fid_reference) if fid_reference else None, min_clip=min_clip,
                      min_clip_ratio=min_clip_ratio, max_fid=max_fid, max_fid_ratio=max_fid_ratio, max_kid=max_kid,
                      max_kid_ratio=max_kid_ratio, max_lpips=max_lpips,
                      compile=compile_, compile_mode=compile_mode, parallel=parallel, cache=not no_cache)
    common = Common(family=family, config=config, dtype=dtype, force=force, json_=json_, threads=threads)
    run_op(common, partial(op, embeddings, peer or []), cfg, name="bench", sources=models or [None], outputs=[plot],
           inputs=[prompts_file, embeddings, fid_reference], device=cfg.device, estimate=partial(estimate, cfg),
           write=partial(write, plot), show=partial(show, markdown), gate=gate, distributed=True, lineage=False)


def estimate(cfg, bundles):
    """Weights of every model + the activations of the biggest batch bench will run."""
    from ditkit.ops import memory

    biggest = max(cfg.batch_sizes + ([min(cfg.quality_batch_size, cfg.num_images)] if cfg.num_images else []))
    return memory.inference_estimate("bench", bundles, biggest)


def op(embeddings: Path | None, peers: list[str], bundles: list, cfg):
    from ditkit.formats.embeddings import load_embeddings
    from ditkit.ops.bench import bench
    from ditkit.ops.peers import peer_bundle

    if not cfg.cache:
        note_no_policy(bundles)
    if peers:
        log(f"peers: quantizing {bundles[0].name} in-process ({', '.join(peers)})")
        bundles = [*bundles, *(peer_bundle(bundles[0], p) for p in peers)]

    return bench(bundles, cfg, load_embeddings(embeddings) if embeddings else None, log=log)


def write(plot: Path | None, run: Run, _, report) -> dict:
    doc = report.to_dict()
    if plot is not None:
        from . import bench_render

        bench_render.plot(doc, plot)
        log(f"plot -> {plot}")
    return doc


def show(markdown: bool, doc: dict) -> None:
    from . import bench_render

    if markdown:
        print(bench_render.markdown(doc))
    else:
        bench_render.print_tables(doc)


def gate(report) -> None:
    from ditkit.ops.bench import describe_failures

    if not report.passed:
        raise QualityGateError(describe_failures(report))
