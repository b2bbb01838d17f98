"""ditkit lora-train: train a LoRA adapter; or re-export / fuse an existing one (--lora without --data)."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditkit.formats.errors import ConfigError
from ditkit.formats.lora import ADAPTER_FORMATS, load_adapter
from ditkit.formats.checkpoint import CheckpointStore
from ditkit.ops.lora_train import TARGETS, LoraConfig, check_train, checkpoint_dir
from ditkit.ops.runtime import resolve_device

from . import output
from .options import (CheckpointDirOpt, CheckpointEveryOpt, ConfigOpt, DeviceOpt, FamilyOpt, ForceOpt,
                      GradAccumOpt, GradCheckpointingOpt, JsonOpt, MixedPrecisionOpt, ModelArg, ResumeOpt, SeedOpt,
                      ShardingOpt, ThreadsOpt, ValidateEveryOpt, WarmupStepsOpt)
from .run import Common, Run, log, run_op, split_csv

TARGET_HELP = "; ".join(f"{k}: {t.help}" for k, t in TARGETS.items())


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
    warmup_steps: WarmupStepsOpt = 20,
    grad_accum: GradAccumOpt = 1,
    mixed_precision: MixedPrecisionOpt = "no",
    grad_checkpointing: GradCheckpointingOpt = False,
    sharding: ShardingOpt = "ddp",
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
    validate_every: ValidateEveryOpt = 0,
    validation_images: Annotated[int, typer.Option(help="Images per validation.")] = 8,
    validation_steps: Annotated[Optional[int], typer.Option(help="Sampling steps of validation images "
                                                                 "(default: the model's).")] = None,
    checkpoint_every: CheckpointEveryOpt = 100,
    checkpoint_dir_: CheckpointDirOpt = None,
    resume: ResumeOpt = False,
    format_: Annotated[str, typer.Option("--format", help=f"Adapter layout: {' or '.join(ADAPTER_FORMATS)} "
                                                          "(diffusers/PEFT keys; kohya names + .alpha; or original: the "
                                                          "authors' module names, lora_unet_blocks_0_attn_qkv, as "
                                                          "sd-scripts writes them and ComfyUI reads them; flux, sd3, "
                                                          "pixart).")] = "peft",
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
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
):
    """Train a LoRA adapter on a folder of images (any family), save it as diffusers/PEFT or kohya safetensors,
    and optionally fuse it into a new bundle. With --lora and no --data: fuse or re-export an existing adapter."""
    device = resolve_device(device)
    common = Common(src, family=family, config=config, device=device, force=force, json_=json_, threads=threads)
    if check_mode(format_, data, lora):
        return adapt(common, lora, lora_scale, out, fuse_into, format_)
    check_train(out, lora_scale)
    cfg = LoraConfig(rank=rank, alpha=alpha, targets=split_csv(targets), steps=steps, batch_size=batch_size, lr=lr,
                     warmup_steps=warmup_steps, grad_accum=grad_accum, mixed_precision=mixed_precision,
                     grad_checkpointing=grad_checkpointing, ema_decay=ema_decay, checkpoint_every=checkpoint_every,
                     validate_every=validate_every, validation_images=validation_images,
                     validation_steps=validation_steps, seed=seed, trigger=trigger, caption_dropout=caption_dropout,
                     prior_images=prior_images, prior_weight=prior_weight, sharding=sharding, device=device)
    from ditkit.ops import distributed, sharding as shard_modes

    shard_modes.check_run(cfg.sharding, cfg.mixed_precision, device, distributed.world()[1])
    ckpt = checkpoint_dir(out, checkpoint_dir_)
    job = dict(data=data, ckpt=ckpt, resume=resume, force=force, embeddings=embeddings, fuse=fuse_into is not None)
    run_op(common, partial(train, job, format_), cfg, name="lora-train", outputs=[out, fuse_into], work_dirs=[ckpt],
           inputs=[data, embeddings], prepare=partial(CheckpointStore(ckpt).check_run, resume, force), device=device,
           write=partial(write, out, fuse_into, format_, {"out": str(out), "format": format_, "checkpoint_dir": str(ckpt)}),
           rows=rows,
           distributed=True, title=f"lora-train -> {out}")


def check_mode(format_: str, data: Path | None, lora: list[Path] | None) -> bool:
    """True: fuse or re-export the --lora adapters; False: train on --data."""
    if format_ not in ADAPTER_FORMATS:
        raise ConfigError(f"unknown --format {format_!r}, choose one of: {', '.join(ADAPTER_FORMATS)}")
    if lora and data is not None:
        raise ConfigError("give --data DIR to train, or --lora ADAPTER to fuse / re-export one, not both")
    if not lora and data is None:
        raise ConfigError("lora-train needs --data DIR (or --lora ADAPTER to fuse or re-export one)")
    return bool(lora)


def train(job: dict, fmt: str, bundle, cfg):
    from ditkit.formats.lora import authors_table
    from ditkit.ops.lora_train import lora_train_job

    if fmt == "original":
        authors_table(bundle.family.name)  # a family without an authors' layout is refused before training

    with output.progress("lora-train", cfg.steps) as bar:
        task = bar.add_task("train", total=cfg.steps)
        return lora_train_job(bundle, cfg, **job, log=log, on_step=lambda step, loss: bar.update(task, completed=step))


def adapt(common: Common, paths: list[Path], scales, out: Path | None, fuse_into: Path | None, fmt: str) -> None:
    """--lora without --data: re-export the adapter (-o, e.g. --format kohya) and/or fuse them (--fuse-into)."""
    from ditkit.ops.lora_train import lora_adapt_job, needs_model

    if out is None and fuse_into is None:
        raise ConfigError("with --lora, give -o ADAPTER.safetensors (re-export, e.g. --format kohya) and/or "
                          "--fuse-into DIR")
    if out is not None and len(paths) != 1:
        raise ConfigError("-o re-exports one adapter; give a single --lora")
    adapters = [load_adapter(p) for p in paths]
    reexport, fuse = out is not None, fuse_into is not None
    run_op(common, lambda bundles, _: lora_adapt_job(bundles[0] if bundles else None, adapters, scales,
                                                     reexport=reexport, fuse=fuse), None,
           name="lora-train", sources=[common.src] if needs_model(adapters, reexport, fuse, fmt) else [],
           outputs=[out, fuse_into], inputs=paths, device=common.device, write=partial(write, out, fuse_into, fmt, {}),
           rows=rows, title="lora-train (fuse / export)")


def write(out: Path | None, fuse_into: Path | None, fmt: str, head: dict, run: Run, job, report) -> dict:
    """The adapter (-o) and the fused bundle (--fuse-into), each atomically."""
    from ditkit.formats.layouts import save_bundle
    from ditkit.formats.lora import save_adapter

    doc = {**head, **report.to_dict()}
    if job.adapter is not None:
        save_adapter(out, job.adapter, fmt, force=run.common.force, modules=job.modules)
        doc.update(out=str(out), format=fmt)
    if job.fused is not None:
        manifest = run.manifest({}, op="lora-fuse", config={"adapters": [a.summary() for a in job.adapters],
                                                            "scales": job.scales},
                                defaults=job.fused.manifest.get("defaults"))  # a few-step adapter's sampler
        doc["fused"] = str(save_bundle(job.fused, fuse_into, manifest, force=run.common.force))
    return doc


def rows(doc: dict) -> dict:
    rows = {k: v for k, v in doc.items() if k not in ("data", "validation", "peak_memory_mb")}
    if "validation" in doc:
        rows["validation"] = doc["validation"]
    return rows
