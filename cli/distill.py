"""ditkit distill: recover a pruned student from its teacher, or distill a few-step student from a base."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditkit.formats.errors import ConfigError, choice_error
from ditkit.ops.distill import DISTILL_MODES, DistillConfig
from ditkit.formats.checkpoint import CheckpointStore
from ditkit.ops.distill.job import checkpoint_root
from ditkit.ops.runtime import resolve_device

from . import output
from .options import (CheckpointDirOpt, CheckpointEveryOpt, ConfigOpt, DeviceOpt, FamilyOpt, ForceOpt,
                      GradAccumOpt, GradCheckpointingOpt, JsonOpt, MixedPrecisionOpt, ModelArg, OptionalOutOpt,
                      ResumeOpt, SeedOpt, ShardingOpt, ThreadsOpt, ValidateEveryOpt, WarmupStepsOpt)
from .run import Common, Run, log, run_op

MODE_HELP = "; ".join(f"{name}: {m.help}" for name, m in DISTILL_MODES.items())


def _default(mode: str, name: str) -> str:
    return ", ".join(f"{m}: {d.defaults[name]}" for m, d in DISTILL_MODES.items() if name in d.defaults)


def summary(doc: dict) -> dict:
    rows = {"mode": doc["mode"], "family": doc["family"], "teacher": doc["teacher"]["path"],
            "params": f"{doc['params']:,} ({doc['params_trained']:,} trained)",
            "steps": f"{doc['steps']} x batch {doc['batch_size']}"
                     + (f" (resumed from {doc['resumed_from']})" if doc["resumed_from"] is not None else ""),
            "final loss": f"{doc['final_loss']:.6g}", "seconds": f"{doc['seconds']} ({doc['train_seconds']} training)",
            "student defaults": doc["defaults"]}
    for name in ("baseline", "validation"):
        v = doc[name]
        if v:
            rows[name] = ", ".join(f"{k} {v[k]}" for k in ("steps", "guidance", "accuracy", "fd", "psnr_vs_teacher")
                                   if k in v)
    rows["checkpoints + log"] = doc["checkpoint_dir"]
    return rows


def distill_cmd(
    src: ModelArg = None,
    out: OptionalOutOpt = None,
    mode: Annotated[Optional[str], typer.Option(help=f"What to distill. {MODE_HELP}.")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher checkpoint (default: recover: the parent recorded in "
                                                        "the student's ditkit.json; steps: SRC itself, or a base that "
                                                        "teaches a smaller SRC, e.g. a depth-pruned one).")] = None,
    student_steps: Annotated[Optional[int], typer.Option(help="steps: sampler steps of the student (4).")] = None,
    teacher_substeps: Annotated[Optional[int], typer.Option(help="steps: teacher steps per student step (default: "
                                                                 "teacher's steps / student steps, rounded up).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="steps: teacher guidance folded into the student (default: "
                                                           "the teacher's own).")] = None,
    prediction: Annotated[Optional[str], typer.Option(help="steps: what the student's output means on epsilon "
                                                          "families: epsilon, v_prediction, sample, or auto "
                                                          "(epsilon for 2+ steps, v_prediction for 1).")] = None,
    as_lora: Annotated[bool, typer.Option("--as-lora", help="steps: write the student as a LoRA over SRC (-o "
                                          "FILE.safetensors): only the Linears' weights train, then each delta is "
                                          "cut to --rank by SVD; the file carries the student's sampler settings "
                                          "for generate --lora.")] = False,
    rank: Annotated[Optional[int], typer.Option(help="--as-lora: rank of the LoRA (32).")] = None,
    feedback_block: Annotated[Optional[int], typer.Option(help="feedback: the block whose output the feedback module "
                                                              "predicts at partial steps (default: the last).")] = None,
    target_speedup: Annotated[Optional[float], typer.Option(help="feedback: predicted speedup per image that sets "
                                                                 "how many steps are partial; an error when out of "
                                                                 "reach (default: up to 1.7, as far as reachable).")] = None,
    output_weight: Annotated[Optional[float], typer.Option(help="recover, feedback: weight of output matching "
                                                                "(1.0).")] = None,
    feature_weight: Annotated[Optional[float], typer.Option(help="recover, feedback: weight of block-feature matching "
                                                                 f"({_default('recover', 'feature_weight')}).")] = None,
    cfg_weight: Annotated[Optional[float], typer.Option(help="recover: weight of the guidance direction's relative "
                                                             "error, cond minus uncond output "
                                                             f"({_default('recover', 'cfg_weight')}).")] = None,
    mask_outliers: Annotated[Optional[float], typer.Option(help="recover: fraction of tokens with the largest feature "
                                                                "error dropped from the loss (0 = off).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="recover: image folder for a ground-truth loss (DIR/<class>/"
                                                        "*.png for class models).")] = None,
    gt_weight: Annotated[Optional[float], typer.Option(help="recover: weight of the ground-truth loss (1.0).")] = None,
    embeddings: Annotated[Optional[Path], typer.Option(help=(
        "Text families: prompt embeddings (.safetensors) the teacher samples on (default: the model's own prompts "
        "through its text encoder; random embeddings for a model with neither)."))] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"Training steps ({_default('', 'steps')}).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Global batch ({_default('', 'batch_size')}).")] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"AdamW learning rate ({_default('', 'lr')}).")] = None,
    warmup_steps: WarmupStepsOpt = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    grad_accum: GradAccumOpt = 1,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0 = off).")] = 1.0,
    ema_decay: Annotated[Optional[float], typer.Option(help=f"EMA decay of the student, 0 = off "
                                                            f"({_default('', 'ema_decay')}).")] = None,
    mixed_precision: MixedPrecisionOpt = "no",
    grad_checkpointing: GradCheckpointingOpt = False,
    sharding: ShardingOpt = "ddp",
    pool_size: Annotated[Optional[int], typer.Option(help=f"Teacher trajectories precomputed as inputs "
                                                          f"({_default('', 'pool_size')}).")] = None,
    val_images: Annotated[Optional[int], typer.Option(help="Validation images (100 with a judge, else 8).")] = None,
    validate_every: ValidateEveryOpt = 0,
    checkpoint_every: CheckpointEveryOpt = 100,
    checkpoint_dir: CheckpointDirOpt = None,
    resume: ResumeOpt = False,
    threads: ThreadsOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
):
    """Distill a student from a teacher: recover a pruned model, make a few-step one, or train a feedback module
    that makes some steps partial (--mode feedback); exact --resume."""
    device = resolve_device(device)
    cfg = DistillConfig(mode=check_mode(mode), steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                        ema_decay=ema_decay, weight_decay=weight_decay, grad_accum=grad_accum,
                        max_grad_norm=max_grad_norm, mixed_precision=mixed_precision,
                        grad_checkpointing=grad_checkpointing, sharding=sharding, checkpoint_every=checkpoint_every,
                        validate_every=validate_every, seed=seed, pool_size=pool_size, output_weight=output_weight,
                        feature_weight=feature_weight, cfg_weight=cfg_weight, mask_outliers=mask_outliers,
                        gt_weight=gt_weight if images is not None or gt_weight is not None else None,
                        student_steps=student_steps, teacher_substeps=teacher_substeps, guidance=guidance,
                        prediction=prediction, as_lora=as_lora, rank=rank,
                        feedback_block=feedback_block, target_speedup=target_speedup,
                        val_images=val_images, device=device)
    check_options(cfg, images, out)
    common = Common(src, family=family, config=config, device=device, force=force, json_=json_, threads=threads)
    root = checkpoint_root(out, checkpoint_dir)
    job = dict(root=root, teacher=teacher, resume=resume, force=force, embeddings=embeddings, images=images)
    run_op(common, partial(op, job), cfg, name="distill", outputs=[out], work_dirs=[root],
           inputs=[teacher, embeddings, images], prepare=partial(CheckpointStore(root).check_run, resume, force),
           device=device, write=partial(write, out, root), rows=summary, distributed=True,
           title=f"distill {cfg.mode} -> {out}")


def check_mode(mode: str | None) -> str:
    if mode is None:
        raise ConfigError(f"--mode is required, choose one of: {', '.join(DISTILL_MODES)}")
    if mode not in DISTILL_MODES:
        raise choice_error("distill mode", mode, DISTILL_MODES)
    return mode


def check_options(cfg: DistillConfig, images: Path | None, out: Path | None) -> None:
    from ditkit.ops import distributed, sharding

    sharding.check_run(cfg.sharding, cfg.mixed_precision, cfg.device, distributed.world()[1])
    if images is not None and cfg.mode != "recover":
        raise ConfigError(f"--images does not apply to --mode {cfg.mode} (it is data-free)")
    if out is None:
        raise ConfigError("distill needs -o OUT")
    if cfg.as_lora and Path(out).suffix != ".safetensors":
        raise ConfigError(f"--as-lora writes one LoRA file: -o must end in .safetensors (got {out})")


def op(job: dict, student, cfg):
    """The distill job with its progress bars (training loss, the teacher's pool) and sample grids."""
    from ditkit.ops.distill.job import distill_job

    with output.progress(f"distill {cfg.mode}", cfg.steps) as bar:
        task = bar.add_task("train", total=cfg.steps)
        pool_task = bar.add_task("pool", total=cfg.pool_size)
        return distill_job(
            student, cfg, **job, log=log,
            progress=lambda step, loss: bar.update(task, completed=step, description=f"loss {loss:.4g}"),
            pool_progress=lambda k: bar.advance(pool_task, k),
            on_validation=lambda step, imgs, m: write_grid(job["root"], step, imgs))


def write_grid(root: Path, step: int, images) -> None:
    from PIL import Image

    from ditkit.formats.atomic import atomic_file
    from ditkit.formats.images import grid

    (root / "samples").mkdir(parents=True, exist_ok=True)
    with atomic_file(root / "samples" / f"step-{step:06d}.png", force=True) as tmp:
        Image.fromarray(grid(images)).save(tmp, format="PNG")


def write(out: Path, root: Path, run: Run, bundle, report) -> dict:
    from ditkit.formats.layouts import save_bundle
    from ditkit.formats.lora import Adapter, save_adapter

    if isinstance(bundle, Adapter):  # --as-lora: the adapter file, with the run's report in its metadata
        bundle.info["report"] = {k: report.to_dict()[k] for k in ("steps", "baseline", "validation", "details")}
        save_adapter(out, bundle, force=run.common.force)
        return {"out": str(out), "checkpoint_dir": str(root), **report.to_dict()}
    manifest = run.manifest(report, config={**run.cfg.to_dict(), "teacher": report.teacher}, defaults=report.defaults)
    save_bundle(bundle, out, manifest, force=run.common.force)
    return {"out": str(out), "checkpoint_dir": str(root), **report.to_dict()}


