"""ditkit generate: sample images from a checkpoint."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditkit.formats.atomic import check_output
from ditkit.formats.layouts import load_bundle
from ditkit.formats.embeddings import load_embeddings
from ditkit.formats.errors import ConfigError, FormatError
from ditkit.formats.images import write_images
from ditkit.formats.manifest import environment
from ditkit.ops import distributed, memory
from ditkit.ops.generate import GenerateConfig, generate
from ditkit.ops.runtime import resolve_device, resolve_dtype

from . import output
from .options import (ConfigOpt, DeviceOpt, DtypeOpt, FamilyOpt, ForceOpt, JsonOpt, ModelArg, OutOpt, SeedOpt)


def parse_ints(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, e.g. 3,7 (got {text!r})")


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str] | None:
    if prompts_file is not None:
        try:
            prompts = prompts + [l.strip() for l in prompts_file.read_text().splitlines() if l.strip()]
        except OSError as e:
            raise FormatError(f"cannot read --prompts-file {prompts_file} ({e.strerror})")
    return prompts or None


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # the current stderr


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
            print(f"note: {a.path} was trained on another base ({a.base_sha256[:12]}), this is {base[:12]}",
                  file=sys.stderr)
    return [{**a.summary(), "scale": s} for a, s in zip(adapters, scales)]


def generate_cmd(
    src: ModelArg = None,
    out: OutOpt = Path("out"),
    labels: Annotated[Optional[str], typer.Option(help="Class ids, comma-separated (dit), e.g. 3,7.")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(help="A prompt (repeatable; text families).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="A file with one prompt per line.")] = None,
    embeddings: Annotated[Optional[Path], typer.Option(help="Precomputed text embeddings (.safetensors).")] = None,
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
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Ignore the model's step-caching policy "
                                           "(ditkit cache): run every block at every step.")] = False,
    no_feedback: Annotated[bool, typer.Option("--no-feedback", help="Ignore the model's feedback module (distill "
                                              "--mode feedback): run every block at every step.")] = False,
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
):
    """Generate images (PNGs, a grid and a JSON sidecar); scored by the model's judge when it has one."""
    cfg = GenerateConfig(labels=parse_ints(labels, "--labels"), prompts=read_prompts(prompt or [], prompts_file),
                         num_images=num_images, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                         batch_size=batch_size, height=height, width=width, device=resolve_device(device), dtype=dtype,
                         backend=backend, cache=not no_cache, feedback=not no_feedback)
    rank, _ = distributed.world()
    if rank == 0:
        check_output(out, force)
    torch_dtype = resolve_dtype(dtype, cfg.device)
    memory.check(memory.load_estimate(src, dtype=torch_dtype), cfg.device, force, say)  # before allocating
    bundle = load_bundle(src, family=family, config=config, device=cfg.device, dtype=torch_dtype)
    biggest = min(cfg.batch_size, cfg.num_images or cfg.batch_size)  # the batch generate will run
    memory.check(memory.inference_estimate("generate", [bundle], biggest, cfg.height, cfg.width), cfg.device, force,
                 say)
    if lora and bundle.feedback is not None and cfg.feedback:
        raise ConfigError("--lora changes the backbone this model's feedback module was trained on; pass "
                          "--no-feedback, or fuse the adapter first and distill --mode feedback on the fused model")
    adapters = with_lora(bundle, lora or [], lora_scale or [])
    emb = load_embeddings(embeddings) if embeddings else None
    with distributed.process_group(cfg.device) as (rank, size):
        n = cfg.num_images or 0
        with output.progress("generating", n) as bar:
            task = bar.add_task("generate", total=n or None)
            images, report = generate(bundle, cfg, emb, progress=lambda k: bar.advance(task, k))
    if images is None:
        return  # not rank 0: rank 0 writes and reports
    sidecar = {"command": "generate", "source": str(bundle.path), "source_sha256": bundle.parent_record()["sha256"],
               "config": cfg.to_dict(), "report": report.to_dict(), "environment": environment(cfg.device)}
    if adapters:
        sidecar["lora"] = adapters
    write_images(out, images, sidecar, force=force)
    doc = {"out": str(out), **report.to_dict(), **({"lora": adapters} if adapters else {})}
    if json_:
        output.print_json(doc)
    else:
        doc.pop("conditions")
        output.print_kv(f"generate -> {out}", doc)
