"""ditkit generate: sample images from a checkpoint."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditkit.formats.errors import ConfigError

from . import output
from .options import (CompileModeOpt, CompileOpt, ConfigOpt, DeviceOpt, DtypeOpt, EmbeddingsOpt, FamilyOpt, ForceOpt,
                      JsonOpt, LabelsOpt, ModelArg, NoCacheOpt, OutOpt, ParallelOpt, PromptOpt, PromptsFileOpt, SeedOpt,
                      ThreadsOpt, parse_ints, read_prompts)
from .run import Common, Run, log, note_no_policy, run_op


def generate_cmd(
    src: ModelArg = None,
    out: OutOpt = Path("out"),
    labels: LabelsOpt = None,
    prompt: PromptOpt = None,
    prompts_file: PromptsFileOpt = None,
    embeddings: EmbeddingsOpt = None,
    num_images: Annotated[Optional[int], typer.Option(help="Images to make; they cycle through labels/prompts.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default: the model's own).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddim, dpm++, euler, flow-euler (default: the model's).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (default: the model's).")] = None,
    seed: SeedOpt = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass, rounded up to a multiple of 4 (never changes the images).")] = 8,
    height: Annotated[Optional[int], typer.Option(help="Height in pixels (default: native).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Width in pixels (default: native).")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    backend: Annotated[Optional[str], typer.Option(help="pytorch or onnxruntime (an ONNX bundle from ditkit export; "
                                                   "default: the model's own).")] = None,
    lora: Annotated[Optional[list[Path]], typer.Option(help="A LoRA adapter .safetensors (repeatable).")] = None,
    lora_scale: Annotated[Optional[list[float]], typer.Option(help="Scale of the adapters (one, or one per "
                                                                   "--lora; default 1).")] = None,
    no_cache: NoCacheOpt = False,
    no_feedback: Annotated[bool, typer.Option("--no-feedback", help="Ignore the model's feedback module (distill "
                                              "--mode feedback): run every block at every step.")] = False,
    compile_: CompileOpt = False,
    compile_mode: CompileModeOpt = "regional",
    parallel: ParallelOpt = "images",
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
):
    """Generate images (PNGs, a grid and a JSON sidecar); scored by the model's judge when it has one."""
    from ditkit.ops.generate import GenerateConfig
    from ditkit.ops.runtime import resolve_device

    cfg = GenerateConfig(labels=parse_ints(labels, "--labels"), prompts=read_prompts(prompt or [], prompts_file),
                         num_images=num_images, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                         batch_size=batch_size, height=height, width=width, device=resolve_device(device), dtype=dtype,
                         backend=backend, cache=not no_cache, feedback=not no_feedback,
                         compile=compile_, compile_mode=compile_mode, parallel=parallel)
    common = Common(src, family=family, config=config, device=cfg.device, dtype=dtype, force=force, json_=json_,
                    threads=threads)
    run_op(common, partial(op, lora or [], lora_scale or [], embeddings), cfg, name="generate", outputs=[out],
           inputs=[prompts_file, embeddings, *(lora or [])], device=cfg.device, write=partial(write, out),
           estimate=partial(estimate, cfg), rows=rows, distributed=True, title=f"generate -> {out}")


def estimate(cfg, bundles):
    """The memory of the batch generate will run, once the weights are loaded."""
    from ditkit.ops import memory

    biggest = min(cfg.batch_size, cfg.num_images or cfg.batch_size)
    return memory.inference_estimate("generate", bundles, biggest, cfg.height, cfg.width)


def op(lora: list[Path], scales: list[float], embeddings: Path | None, bundle, cfg):
    """Adapters applied, then generate with a progress bar."""
    from ditkit.formats.embeddings import load_embeddings
    from ditkit.ops.generate import generate

    if lora and bundle.feedback is not None and cfg.feedback:
        raise ConfigError("--lora changes the backbone this model's feedback module was trained on; pass "
                          "--no-feedback, or fuse the adapter first and distill --mode feedback on the fused model")
    if not cfg.cache:
        note_no_policy([bundle])
    adapters = with_lora(bundle, lora, scales)
    emb = load_embeddings(embeddings) if embeddings else None
    n = cfg.num_images or 0
    with output.progress("generating", n) as bar:
        task = bar.add_task("generate", total=n or None)
        images, report = generate(bundle, cfg, emb, progress=lambda k: bar.advance(task, k))
    return (images, adapters), report


def with_lora(bundle, paths: list[Path], scales: list[float]) -> list[dict]:
    """Load --lora adapters into the bundle (ops.lora.apply_lora); their summaries for the report."""
    if scales and not paths:
        raise ConfigError("--lora-scale needs --lora ADAPTER")
    if not paths:
        return []
    from ditkit.formats.lora import load_adapter
    from ditkit.ops.lora import adapter_scales, apply_lora

    adapters = [load_adapter(p) for p in paths]
    scales = adapter_scales(scales, len(adapters))
    apply_lora(bundle, adapters, scales)
    base = bundle.parent_record().get("sha256")
    for a in adapters:
        if a.base_sha256 and base and a.base_sha256 != base:
            log(f"note: {a.path} was trained on another base ({a.base_sha256[:12]}), this is {base[:12]}")
    return [{**a.summary(), "scale": s} for a, s in zip(adapters, scales)]


def write(out: Path, run: Run, result, report) -> dict:
    from ditkit.formats.images import write_images
    from ditkit.formats.manifest import environment

    images, adapters = result
    sidecar = {"command": "generate", "source": str(run.bundle.path), "source_sha256": run.parent["sha256"],
               "config": run.cfg.to_dict(), "report": report.to_dict(), "environment": environment(run.device)}
    if adapters:
        sidecar["lora"] = adapters
    write_images(out, images, sidecar, force=run.common.force)
    return {"out": str(out), **report.to_dict(), **({"lora": adapters} if adapters else {})}


def rows(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "conditions"}
