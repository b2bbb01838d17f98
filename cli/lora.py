"""ditkit lora-train: train a LoRA adapter; or re-export / fuse an existing one (--lora without --data)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditkit.formats.atomic import check_output
from ditkit.formats.layouts import load_bundle, resolve_source, save_bundle
from ditkit.formats.checkpoint import CheckpointStore
from ditkit.formats.datasets import CACHE, load_cache, read_image_folder, save_cache, save_validation
from ditkit.formats.embeddings import load_embeddings
from ditkit.formats.errors import ConfigError, HardwareError, OutputExistsError
from ditkit.formats.lora import ADAPTER_FORMATS, load_adapter, save_adapter
from ditkit.formats.manifest import new_manifest
from ditkit.ops import distributed, memory
from ditkit.ops.lora import (TARGETS, LoraConfig, adapter_scales, cache_key, encode_data, extract_adapter, fuse_lora,
                             lora_train, native_size)
from ditkit.ops.runtime import resolve_device, resolve_dtype

from . import output
from .options import ConfigOpt, DeviceOpt, FamilyOpt, ForceOpt, JsonOpt, ModelArg, SeedOpt

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # the current stderr (output.err keeps the one it was built with)


TARGET_HELP = "; ".join(f"{k}: {t.help}" for k, t in TARGETS.items())


def checkpoint_dir(out: Path, given: Path | None) -> Path:
    """Resumable state lives beside the adapter (OUT.ckpt/), never inside the atomic output."""
    return given if given is not None else out.with_suffix(".ckpt")


def lora_train_cmd(
    src: ModelArg = None,
    data: Annotated[Optional[Path], typer.Option(help="Training images: name.png + name.txt captions, a "
                                                      "metadata.jsonl, or class folders 0/ 1/ ... (dit).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Adapter file to write (.safetensors, "
                                                                    "atomically).")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 4,
    alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha; the update is scaled by alpha/rank "
                                                        "(default: = rank). Always saved in the file.")] = None,
    targets: Annotated[str, typer.Option(help=f"Comma-separated layer groups. {TARGET_HELP}.")] = "attention",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 400,
    batch_size: Annotated[int, typer.Option(help="Global batch per step (all processes).")] = 32,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW).")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 20,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per step.")] = 1,
    mixed_precision: Annotated[str, typer.Option(help="no, bf16 or fp16 (CUDA).")] = "no",
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute activations in "
                                                     "backward (less memory).")] = False,
    ema_decay: Annotated[float, typer.Option(help="EMA of the adapter (0 = off).")] = 0.0,
    trigger: Annotated[Optional[str], typer.Option(help="Text families: a word added to every caption "
                                                        "(or put where a caption says {trigger}).")] = None,
    caption_dropout: Annotated[float, typer.Option(help="Text families: share of images trained with the empty "
                                                        "prompt (keeps guidance working).")] = 0.1,
    prior_images: Annotated[int, typer.Option(help="Prior preservation: images the base generates itself from "
                                                   "the captions without the trigger (0 = off).")] = 0,
    prior_weight: Annotated[float, typer.Option(help="Weight of the prior-preservation loss.")] = 1.0,
    embeddings: Annotated[Optional[Path], typer.Option(help="Precomputed text embeddings (.safetensors) holding "
                                                            "every caption, for models without a text encoder.")] = None,
    validate_every: Annotated[int, typer.Option(help="Seeded validation samples every N steps (0: at the end).")] = 0,
    validation_images: Annotated[int, typer.Option(help="Images per validation.")] = 8,
    validation_steps: Annotated[Optional[int], typer.Option(help="Sampling steps of validation images "
                                                                 "(default: the model's).")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 100,
    checkpoint_dir_: Annotated[Optional[Path], typer.Option("--checkpoint-dir", help="Resumable state, log.jsonl, "
                                                            "data cache, validation grids (default: OUT.ckpt/).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint directory.")] = False,
    format_: Annotated[str, typer.Option("--format", help=f"Adapter layout: {' or '.join(ADAPTER_FORMATS)} "
                                                          "(diffusers/PEFT keys, or kohya names + .alpha).")] = "peft",
    lora: Annotated[Optional[list[Path]], typer.Option(help="An existing adapter to fuse or re-export instead of "
                                                            "training (repeatable).")] = None,
    lora_scale: Annotated[Optional[list[float]], typer.Option(help="Scale of each --lora when fusing (one, or "
                                                                   "one per adapter).")] = None,
    fuse_into: Annotated[Optional[Path], typer.Option(help="Also write a bundle with the adapter fused into the "
                                                           "weights (a new checkpoint directory).")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
):
    """Train a LoRA adapter on a folder of images (any family), save it as diffusers/PEFT or kohya safetensors,
    and optionally fuse it into a new bundle. With --lora and no --data: fuse or re-export an existing adapter."""
    device = resolve_device(device)
    if format_ not in ADAPTER_FORMATS:
        raise ConfigError(f"unknown --format {format_!r}, choose one of: {', '.join(ADAPTER_FORMATS)}")
    if lora:
        if data is not None:
            raise ConfigError("give --data DIR to train, or --lora ADAPTER to fuse / re-export one, not both")
        return _fuse_or_export(src, lora, lora_scale, out, fuse_into, format_, device, family, config, force, json_)
    if data is None:
        raise ConfigError("lora-train needs --data DIR (or --lora ADAPTER to fuse or re-export one)")
    if out is None or out.suffix != ".safetensors":
        raise ConfigError("lora-train needs -o ADAPTER.safetensors")
    if lora_scale:
        raise ConfigError("--lora-scale goes with --lora; a trained adapter is fused at scale 1")
    cfg = LoraConfig(rank=rank, alpha=alpha, targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
                     steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, grad_accum=grad_accum,
                     mixed_precision=mixed_precision, grad_checkpointing=grad_checkpointing, ema_decay=ema_decay,
                     checkpoint_every=checkpoint_every, validate_every=validate_every,
                     validation_images=validation_images, validation_steps=validation_steps, seed=seed,
                     trigger=trigger, caption_dropout=caption_dropout, prior_images=prior_images,
                     prior_weight=prior_weight, device=device)
    rank0 = distributed.world()[0] == 0
    ckpt = checkpoint_dir(out, checkpoint_dir_)
    if rank0:
        check_output(out, force)
        if fuse_into is not None:
            check_output(fuse_into, force, inputs=(resolve_source(src),))
        _fresh_start(ckpt, resume, force)
    memory.check(memory.load_estimate(src), device, force, log)  # before loading
    bundle = load_bundle(src, family=family, config=config, device=device, dtype=resolve_dtype("fp32", device))
    emb = load_embeddings(embeddings) if embeddings else None
    folder = read_image_folder(data, size=native_size(bundle))
    key = cache_key(bundle, folder, cfg)
    made = ckpt if rank0 and not ckpt.exists() else None  # removed again if the memory check refuses the job
    cached = load_cache(ckpt / CACHE, key)
    if cached is None:
        tensors, info = encode_data(bundle, folder, cfg, emb)
        if rank0:
            save_cache(ckpt / CACHE, tensors, key, info)
    else:
        tensors, info = cached
        log(f"data: latents and embeddings from the cache {ckpt / CACHE}")
    store = CheckpointStore(ckpt)

    def on_plan(plan: dict) -> None:  # before the optimizer and step 1
        mem = plan["memory"]
        est = memory.Estimate("lora-train", {k: mem[k] for k in ("weights", "optimizer", "activations")},
                              allocated=mem["weights"],
                              hint="use a smaller --batch-size, more --grad-accum or --grad-checkpointing")
        try:
            memory.check(est, device, force, log)
        except HardwareError:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)  # the data cache this run wrote: nothing left behind
            raise

    with distributed.process_group(device) as (rank_, _):
        with output.progress("lora-train", cfg.steps) as bar:
            task = bar.add_task("train", total=cfg.steps)
            bundle, report = lora_train(
                bundle, cfg, tensors, store, resume, embeddings=emb, data_info=info, log=log, on_plan=on_plan,
                on_step=lambda step, loss: bar.update(task, completed=step),
                on_validation=lambda step, images, conds, metrics: rank_ == 0 and save_validation(
                    ckpt, step, images, conds, metrics))
    if not rank0:
        return
    adapter = extract_adapter(bundle, cfg, info={"trigger": trigger, "lora_config": cfg.to_dict(),
                                                 "report": {k: v for k, v in report.to_dict().items()
                                                            if k in ("steps", "final_loss", "adapter_fraction",
                                                                     "base_unchanged", "validation")},
                                                 "data": {k: v for k, v in info.items() if k != "captions_used"}})
    save_adapter(out, adapter, format_, force=force)
    doc = {"out": str(out), "format": format_, "checkpoint_dir": str(ckpt), **report.to_dict()}
    if fuse_into is not None:
        doc["fused"] = str(_write_fused(bundle, bundle.parent_record(), [adapter], [1.0], fuse_into, device, force))
    _print(doc, json_, f"lora-train -> {out}")


def _fresh_start(ckpt: Path, resume: bool, force: bool) -> None:
    """Without --resume, an old run's checkpoint is an error (or, with --force, cleared; the data cache stays)."""
    store = CheckpointStore(ckpt)
    if resume or not (store.exists() or (ckpt / "log.jsonl").exists()):
        return
    if not force:
        raise OutputExistsError(f"{ckpt} holds a previous run's checkpoint; pass --resume to continue it or "
                                "--force to start over")
    shutil.rmtree(store.ckpt, ignore_errors=True)
    shutil.rmtree(ckpt / "validation", ignore_errors=True)
    (ckpt / "log.jsonl").unlink(missing_ok=True)


def _write_fused(bundle, parent: dict, adapters, scales, out: Path, device: str, force: bool) -> Path:
    fused = fuse_lora(bundle, adapters, scales)
    manifest = new_manifest(family=bundle.family.name, op="lora-fuse",
                            config={"adapters": [a.summary() for a in adapters], "scales": scales},
                            report={}, parent=parent, device=device, defaults=bundle.defaults())
    return save_bundle(fused, out, manifest, force=force)


def _fuse_or_export(src, paths, scales, out, fuse_into, fmt, device, family, config, force, json_):
    if out is None and fuse_into is None:
        raise ConfigError("with --lora, give -o ADAPTER.safetensors (re-export, e.g. --format kohya) and/or "
                          "--fuse-into DIR")
    if out is not None:
        if len(paths) != 1:
            raise ConfigError("-o re-exports one adapter; give a single --lora")
        check_output(out, force, inputs=tuple(paths))
    if fuse_into is not None:
        check_output(fuse_into, force, inputs=(resolve_source(src),))
    adapters = [load_adapter(p) for p in paths]
    scales = adapter_scales(scales, len(adapters))
    doc = {"adapters": [a.summary() for a in adapters], "scales": scales}
    if out is not None:
        from ditkit.formats.lora import match
        from ditkit.ops.lora import linear_modules

        ad = adapters[0]
        if ad.info.get("source_format") == "kohya":  # kohya names are flat: resolve them against the model
            memory.check(memory.load_estimate(src), device, force, log)
            bundle = load_bundle(src, family=family, config=config, device=device)
            ad = match(ad, linear_modules(bundle.transformer))
        save_adapter(out, ad, fmt, force=force)
        doc.update(out=str(out), format=fmt)
    if fuse_into is not None:
        memory.check(memory.load_estimate(src), device, force, log)
        bundle = load_bundle(src, family=family, config=config, device=device)
        doc["fused"] = str(_write_fused(bundle, bundle.parent_record(), adapters, scales, fuse_into, device, force))
    _print(doc, json_, "lora-train (fuse / export)")


def _print(doc: dict, json_: bool, title: str) -> None:
    if json_:
        output.print_json(doc)
        return
    rows = {k: v for k, v in doc.items() if k not in ("data", "validation", "peak_memory_mb")}
    if "validation" in doc:
        rows["validation"] = doc["validation"]
    output.print_kv(title, rows)
