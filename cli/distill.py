"""ditkit distill: recover a pruned student from its teacher, or distill a few-step student from a base."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from ditkit.formats.atomic import atomic_file, check_output
from ditkit.formats.layouts import load_bundle, resolve_source, save_bundle
from ditkit.formats.checkpoint import CheckpointStore
from ditkit.formats.embeddings import load_embeddings
from ditkit.formats.errors import ConfigError, OutputExistsError, choice_error
from ditkit.formats.manifest import new_manifest
from ditkit.ops import distributed, memory
from ditkit.ops.distill import DISTILL_MODES, DistillConfig, distill
from ditkit.ops.generate import latent_hw, vae_scale
from ditkit.ops.runtime import resolve_device

from . import output
from .options import ConfigOpt, DeviceOpt, FamilyOpt, ForceOpt, JsonOpt, ModelArg, SeedOpt

MODE_HELP = "; ".join(f"{name}: {m.help}" for name, m in DISTILL_MODES.items())


def _default(mode: str, name: str) -> str:
    return ", ".join(f"{m}: {d.defaults[name]}" for m, d in DISTILL_MODES.items() if name in d.defaults)


def checkpoint_store(out: Path, checkpoint_dir: Path | None, resume: bool, force: bool,
                     check: bool = True) -> CheckpointStore:
    """OUT.ckpt beside OUT (or --checkpoint-dir): refuse to overwrite an unfinished run by accident.
    Every process reads the checkpoint on --resume; only rank 0 (`check`) validates and clears the directory."""
    root = Path(checkpoint_dir) if checkpoint_dir is not None else out.with_name(out.name + ".ckpt")
    store = CheckpointStore(root)
    if not check:
        return store
    if resume:
        if not store.exists():
            raise ConfigError(f"--resume: no checkpoint in {root}; start without --resume (add --force if {root} "
                              "holds an older run)")
    elif root.exists() and any(root.iterdir()):
        if not force:
            raise OutputExistsError(f"checkpoint directory {root} holds an earlier run; pass --resume to continue it "
                                    "or --force to start over")
        shutil.rmtree(root)  # --force: the earlier run's checkpoint and log are discarded
    return store


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # the current stderr (output.err keeps the one it was built with)


def teacher_source(student, mode: str) -> str | None:
    """The default teacher: the parent recorded in the student's ditkit.json (recover), or None when the input is
    its own teacher (steps). A relative record is tried from here, then beside the student."""
    if DISTILL_MODES[mode].teacher == "self":
        return None
    parent = (student.manifest or {}).get("parent") or {}
    if not parent.get("path"):
        raise ConfigError(f"{student.name} records no parent in its ditkit.json; pass --teacher BASE")
    path = Path(parent["path"])
    tries = [path] + ([student.path.parent / path] if student.path is not None and not path.is_absolute() else [])
    for candidate in tries:
        if candidate.exists():
            return str(candidate)
    raise ConfigError(f"the student's recorded parent {parent['path']} is not there any more; pass --teacher BASE")


def write_grid(root: Path, step: int, images) -> None:
    from PIL import Image

    from ditkit.formats.images import grid

    (root / "samples").mkdir(parents=True, exist_ok=True)
    with atomic_file(root / "samples" / f"step-{step:06d}.png", force=True) as tmp:
        Image.fromarray(grid(images)).save(tmp, format="PNG")


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
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (written atomically).")] = None,
    mode: Annotated[Optional[str], typer.Option(help=f"What to distill. {MODE_HELP}.")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher checkpoint (default: recover: the parent recorded in "
                                                        "the student's ditkit.json; steps: SRC itself).")] = None,
    student_steps: Annotated[Optional[int], typer.Option(help="steps: sampler steps of the student (4).")] = None,
    teacher_substeps: Annotated[Optional[int], typer.Option(help="steps: teacher steps per student step (default: "
                                                                 "teacher's steps / student steps, rounded up).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="steps: teacher guidance folded into the student (default: "
                                                           "the teacher's own).")] = None,
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
    embeddings: Annotated[Optional[Path], typer.Option(help="Text families: prompt embeddings (.safetensors) the "
                                                            "teacher samples on (default: random embeddings).")] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"Training steps ({_default('', 'steps')}).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Global batch ({_default('', 'batch_size')}).")] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"AdamW learning rate ({_default('', 'lr')}).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear LR warm-up steps.")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps (the batch is split into them).")] = 1,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0 = off).")] = 1.0,
    ema_decay: Annotated[Optional[float], typer.Option(help=f"EMA decay of the student, 0 = off "
                                                            f"({_default('', 'ema_decay')}).")] = None,
    mixed_precision: Annotated[str, typer.Option(help="no, bf16 or fp16 (CUDA).")] = "no",
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute activations in "
                                                                                  "backward.")] = False,
    pool_size: Annotated[Optional[int], typer.Option(help=f"Teacher trajectories precomputed as inputs "
                                                          f"({_default('', 'pool_size')}).")] = None,
    val_images: Annotated[Optional[int], typer.Option(help="Validation images (100 with a judge, else 8).")] = None,
    validate_every: Annotated[int, typer.Option(help="Validate every N steps (0 = at the end only).")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 100,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="Checkpoints, log.jsonl and sample grids "
                                                                "(default: OUT.ckpt beside OUT).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in the checkpoint dir.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default 1: small models gain little "
                                                        "from more, and contended threads wait for each other; keep "
                                                        "it for --resume).")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
):
    """Distill a student from a teacher: recover a pruned model, make a few-step one, or train a feedback module
    that makes some steps partial (--mode feedback); exact --resume."""
    if mode is None:
        raise ConfigError(f"--mode is required, choose one of: {', '.join(DISTILL_MODES)}")
    if mode not in DISTILL_MODES:
        raise choice_error("distill mode", mode, DISTILL_MODES)
    device = resolve_device(device)
    cfg = DistillConfig(mode=mode, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                        ema_decay=ema_decay, weight_decay=weight_decay, grad_accum=grad_accum,
                        max_grad_norm=max_grad_norm, mixed_precision=mixed_precision,
                        grad_checkpointing=grad_checkpointing, checkpoint_every=checkpoint_every,
                        validate_every=validate_every, seed=seed, pool_size=pool_size, output_weight=output_weight,
                        feature_weight=feature_weight, cfg_weight=cfg_weight, mask_outliers=mask_outliers,
                        gt_weight=gt_weight if images is not None or gt_weight is not None else None,
                        student_steps=student_steps, teacher_substeps=teacher_substeps, guidance=guidance,
                        feedback_block=feedback_block, target_speedup=target_speedup,
                        val_images=val_images, device=device)
    if images is not None and mode != "recover":
        raise ConfigError(f"--images does not apply to --mode {mode} (it is data-free)")
    if out is None:
        raise ConfigError("distill needs -o OUT")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1 (got {threads})")
    rank, _ = distributed.world()
    if rank == 0:
        check_output(out, force, inputs=(resolve_source(src),))
    memory.check(memory.load_estimate(src), device, force, say)
    store = checkpoint_store(out, checkpoint_dir, resume, force, check=rank == 0)
    student = load_bundle(src, family=family, config=config, device=device)
    teacher_path = teacher if teacher is not None else teacher_source(student, mode)
    teacher_bundle = load_bundle(teacher_path, device=device) if teacher_path is not None else None
    recorded = (student.manifest.get("parent") or {}).get("sha256")
    if teacher is None and teacher_bundle is not None and recorded and \
            teacher_bundle.parent_record()["sha256"] != recorded:
        say(f"warning: the teacher at {teacher_path} has changed since the student was made from it")
    emb = load_embeddings(embeddings) if embeddings else None
    data = None
    if images is not None:
        from ditkit.formats.image_folder import read_image_folder

        s = vae_scale(student)
        h, w = latent_hw(student, None, None)
        data = read_image_folder(images, (h * s, w * s))
    root = store.root

    def on_plan(plan: dict) -> None:
        say(f"plan ({mode}):")
        for k in ("trains", "params_trained", "data", "student", "steps", "batch_size", "lr", "peak_memory_estimate",
                  "validation", "mapping_source"):
            if k in plan:
                say(f"  {k}: {plan[k]}")
        say(f"  checkpoints + log: {root}" + (" (resuming)" if resume else ""))
        mem = plan["memory"]
        memory.check(memory.Estimate("distill", {k: v for k, v in mem.items() if k != "total_estimate"},
                                     allocated=mem["weights"] + mem["pool"],
                                     hint="use a smaller --batch-size or --pool-size"), device, force, say)

    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or 1)
        with distributed.process_group(device), output.progress(f"distill {mode}", cfg.steps) as bar:
            task = bar.add_task("train", total=cfg.steps)
            pool_task = bar.add_task("pool", total=cfg.pool_size)
            bundle, report = distill(
                student, cfg, teacher_bundle, store=store, resume=resume,
                progress=lambda step, loss: bar.update(task, completed=step, description=f"loss {loss:.4g}"),
                embeddings=emb, images=data, log=say, on_plan=on_plan,
                on_validation=lambda step, imgs, m: write_grid(root, step, imgs),
                pool_progress=lambda k: bar.advance(pool_task, k))
    finally:
        torch.set_num_threads(threads_before)
    if rank != 0:
        return  # rank 0 writes and reports
    manifest = new_manifest(family=student.family.name, op="distill",
                            config={**cfg.to_dict(), "teacher": report.teacher}, report=report.to_dict(),
                            parent=student.parent_record(), device=device, defaults=report.defaults)
    save_bundle(bundle, out, manifest, force=force)
    doc = {"out": str(out), "checkpoint_dir": str(root), **report.to_dict()}
    if json_:
        output.print_json(doc)
    else:
        output.print_kv(f"distill {mode} -> {out}", summary(doc))
