"""distill_job(student, cfg, ...) -> (bundle, DistillReport): one `ditkit distill` run around `distill`.

What a run needs besides the training itself: the checkpoint directory's policy (checked before anything is
loaded), the teacher (the student's recorded parent by default), the optional embeddings and ground-truth
images, and the plan's memory check before step 1. No printing: talk goes to `log`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ditkit.formats.checkpoint import CheckpointStore
from ditkit.formats.errors import ConfigError

from . import DISTILL_MODES, DistillConfig, distill

PLAN_KEYS = ("trains", "params_trained", "data", "student", "steps", "batch_size", "lr", "peak_memory_estimate",
             "validation", "mapping_source")


def checkpoint_root(out: Path, checkpoint_dir: Path | None) -> Path:
    """OUT.ckpt beside OUT, or --checkpoint-dir."""
    return Path(checkpoint_dir) if checkpoint_dir is not None else Path(out).with_name(Path(out).name + ".ckpt")


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


def load_teacher(student, cfg: DistillConfig, teacher: str | None, log: Callable[[str], None]):
    """The teacher bundle (None: the student is its own); a warning when the recorded parent has changed."""
    from ditkit.formats.layouts import load_bundle

    path = teacher if teacher is not None else teacher_source(student, cfg.mode)
    if path is None:
        return None
    bundle = load_bundle(path, device=cfg.device)
    recorded = (student.manifest.get("parent") or {}).get("sha256")
    if teacher is None and recorded and bundle.parent_record()["sha256"] != recorded:
        log(f"warning: the teacher at {path} has changed since the student was made from it")
    return bundle


def ground_truth(student, images: Path | None):
    """--images read at the student's native pixel size (None: data-free)."""
    if images is None:
        return None
    from ditkit.formats.image_folder import read_image_folder
    from ditkit.ops.geometry import latent_hw, vae_scale

    s = vae_scale(student)
    h, w = latent_hw(student, None, None)
    return read_image_folder(images, (h * s, w * s), flag="--images").tensors()


def check_plan_memory(plan: dict, device: str, force: bool, log) -> None:
    from ditkit.ops import memory

    mem = plan["memory"]
    memory.check(memory.Estimate("distill", {k: v for k, v in mem.items() if k != "total_estimate"},
                                 allocated=mem["weights"] + mem["pool"],
                                 hint="use a smaller --batch-size or --pool-size"), device, force, log)


def distill_job(student, cfg: DistillConfig, *, root: Path, teacher: str | None = None, resume: bool = False,
                force: bool = False, embeddings: Path | None = None, images: Path | None = None,
                log: Callable[[str], None] = lambda msg: None, progress: Callable | None = None,
                pool_progress: Callable | None = None, on_validation: Callable | None = None):
    """Distill `student` (a loaded bundle) into a new bundle (not saved) and its report; checkpoints and the log
    in `root`. progress(step, loss), pool_progress(k) and on_validation(step, images, metrics) as in `distill`;
    the plan is logged and its memory checked (HardwareError unless `force`) before step 1."""
    from ditkit.formats.embeddings import load_embeddings

    teacher_bundle = load_teacher(student, cfg, teacher, log)
    emb = load_embeddings(embeddings) if embeddings else None
    data = ground_truth(student, images)

    def on_plan(plan: dict) -> None:
        log(f"plan ({cfg.mode}):")
        for k in PLAN_KEYS:
            if k in plan:
                log(f"  {k}: {plan[k]}")
        log(f"  checkpoints + log: {root}" + (" (resuming)" if resume else ""))
        check_plan_memory(plan, cfg.device, force, log)

    store = CheckpointStore(root)
    if force and not resume and store.has_run():
        store.start_over()  # nothing is deleted unless this run gets as far as writing its own checkpoint
    return distill(student, cfg, teacher_bundle, store=store, resume=resume, progress=progress,
                   embeddings=emb, images=data, log=log, on_plan=on_plan, on_validation=on_validation,
                   pool_progress=pool_progress)
