"""distill(student, DistillConfig, teacher) -> (bundle, DistillReport): a student trained to imitate a teacher.

Modes (DISTILL_MODES), one module each:
  recover  a pruned student learns back its teacher's outputs and block features (data-free by default);
  steps    a few-step student, initialized from the teacher, with classifier-free guidance folded in;
  feedback Inner Loop Feedback: the frozen model plus a trained feedback module that makes some of its steps
           partial (same sampler and step count, fewer blocks run).
Every mode runs on the shared training loop (ops.training: accelerate, EMA, exact resume, checkpoints) and is
validated the same way: seeded images at the student's sampling settings, scored by the judge (accuracy, FD)
when the bundle has one, else by PSNR against the teacher's images on the same seeds.
"""
from __future__ import annotations

from typing import ClassVar

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import nn

from ditkit.formats.errors import ConfigError, check_options, choice_error
from ditkit.ops.training import MIXED_PRECISION, TrainConfig, train
from ditkit.ops.config import OpConfig

from . import as_lora, common, feedback, recover, steps
from .common import Job  # noqa: F401 - what a mode hands the loop (re-exported)


@dataclass(frozen=True)
class Mode:
    name: str
    help: str
    prepare: Callable  # (Context) -> Job
    teacher: str  # default teacher: "parent" (the student's recorded parent) or "self" (the input itself)
    defaults: dict  # DistillConfig fields -> this mode's recommended value
    options: tuple[str, ...]  # the mode-specific DistillConfig fields it reads
    copies_student: bool = True  # False: the mode trains a module of its own and leaves the transformer frozen


# measured on tiny-digits (docs/distill.md): the defaults meet the quality bars within the time budget on 2 CPU cores
DISTILL_MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("recover", "knowledge distillation of a pruned student from its teacher: outputs + block features",
         recover.prepare, "parent",
         {"steps": 1000, "batch_size": 32, "lr": 3e-4, "warmup_steps": 50, "ema_decay": 0.99, "pool_size": 512,
          "output_weight": 1.0, "feature_weight": 0.1, "cfg_weight": 0.1, "mask_outliers": 0.0, "gt_weight": 1.0},
         ("output_weight", "feature_weight", "cfg_weight", "mask_outliers", "gt_weight")),
    Mode("steps", "a few-step student with guidance folded in (one-stage progressive distillation)",
         steps.prepare, "self",
         {"steps": 1500, "batch_size": 32, "lr": 3e-4, "warmup_steps": 50, "ema_decay": 0.99, "pool_size": 768,
          "student_steps": 4, "prediction": "auto"},
         ("student_steps", "teacher_substeps", "guidance", "prediction")),
    Mode("feedback", "Inner Loop Feedback: a trained copy of one block predicts the next step's features, so some "
         "steps run only that block and the ones after it (same sampler and steps; the model's weights unchanged)",
         feedback.prepare, "self",
         {"steps": 600, "batch_size": 64, "lr": 1e-3, "warmup_steps": 20, "ema_decay": 0.99, "pool_size": 256,
          "output_weight": 1.0, "feature_weight": 1.0},
         ("output_weight", "feature_weight", "feedback_block", "target_speedup"), copies_student=False),
)}

DEFAULT_LORA_RANK = 32  # docs/distill.md: the reconstruction error and quality measured at 16, 32, 64

TUNED = ("steps", "batch_size", "lr", "warmup_steps", "ema_decay", "pool_size")
MODE_OPTIONS = tuple(sorted({o for m in DISTILL_MODES.values() for o in m.options}))


@dataclass
class DistillConfig(OpConfig):
    TYPE: ClassVar[str] = "distill"

    mode: str = "recover"
    # training (None: the mode's recommended value, see DISTILL_MODES)
    steps: int | None = None  # optimizer steps
    batch_size: int | None = None  # global batch (pool points) per optimizer step
    lr: float | None = None
    warmup_steps: int | None = None
    ema_decay: float | None = None  # 0 disables the EMA; the output holds the EMA weights
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # bf16/fp16 on CUDA
    grad_checkpointing: bool = False
    checkpoint_every: int = 100
    validate_every: int = 0  # 0: validate once, at the end
    seed: int = 0
    sharding: str = "ddp"  # ops/sharding.SHARDING (fsdp: under a launcher, 2+ processes)
    pool_size: int | None = None  # teacher trajectories precomputed as training inputs
    # recover
    output_weight: float | None = None
    feature_weight: float | None = None
    cfg_weight: float | None = None  # relative error of the guidance direction (cond - uncond output)
    mask_outliers: float | None = None  # fraction of tokens (largest feature error) dropped per row
    gt_weight: float | None = None  # weight of the ground-truth loss when images are given
    # steps
    student_steps: int | None = None
    teacher_substeps: int | None = None  # teacher steps per student step (default: ceil(teacher steps / K))
    guidance: float | None = None  # the teacher's guidance folded into the student (default: the teacher's own)
    prediction: str | None = None  # the student's output: auto, epsilon, v_prediction, sample (steps.PREDICTIONS)
    # the student as a LoRA over its base (steps mode): only the Linears' weights train, then each one's delta is
    # cut to rank `rank` by SVD (ops/distill/as_lora.py)
    as_lora: bool = False
    rank: int | None = None  # default DEFAULT_LORA_RANK with as_lora
    # feedback
    feedback_block: int | None = None  # the block whose output the feedback module predicts (default: the last)
    target_speedup: float | None = None  # predicted speedup per image the partial steps must reach (default: up
    # to feedback.DEFAULT_TARGET, as far as the limit on partial steps in a row allows)
    # validation
    val_images: int | None = None  # default: 100 with a judge (FD needs them), else 8
    device: str = "cpu"

    def __post_init__(self):
        check_options(self)  # floats finite, seeds and counts in range (formats/errors.py)
        if self.mode not in DISTILL_MODES:
            raise choice_error("distill mode", self.mode, DISTILL_MODES)
        m = DISTILL_MODES[self.mode]
        for name in MODE_OPTIONS:
            if getattr(self, name) is not None and name not in m.options:
                allowed = ", ".join(f"--{o.replace('_', '-')}" for o in m.options)
                raise ConfigError(f"--{name.replace('_', '-')} does not apply to --mode {self.mode} (its options: "
                                  f"{allowed})")
        for name, default in m.defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.prediction is not None and self.prediction not in steps.PREDICTIONS:
            raise choice_error("prediction", self.prediction, steps.PREDICTIONS)
        if self.rank is not None and not self.as_lora:
            raise ConfigError("--rank sets the rank of --as-lora; pass --as-lora too")
        if self.as_lora:
            if self.mode != "steps":
                raise ConfigError(f"--as-lora applies to --mode steps (its student is a copy of the base); "
                                  f"--mode {self.mode} trains another architecture or a module of its own")
            if self.rank is None:
                self.rank = DEFAULT_LORA_RANK
            if not 1 <= self.rank <= 4096:
                raise ConfigError(f"--rank must be in 1..4096 (got {self.rank})")
        if self.mixed_precision not in MIXED_PRECISION:
            raise choice_error("mixed precision", self.mixed_precision, MIXED_PRECISION)
        for name, lo in (("pool_size", 1), ("val_images", 1), ("student_steps", 1), ("teacher_substeps", 1)):
            v = getattr(self, name)
            if v is not None and v < lo:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {lo} (got {v})")
        if self.student_steps is not None and self.student_steps > 64:
            raise ConfigError(f"--student-steps must be in 1..64 (got {self.student_steps})")
        for name in ("output_weight", "feature_weight", "cfg_weight", "gt_weight"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (got {v})")
        if self.mask_outliers is not None and not 0 <= self.mask_outliers < 1:
            raise ConfigError(f"--mask-outliers must be a fraction in [0, 1) (got {self.mask_outliers})")
        if self.target_speedup is not None and not (isinstance(self.target_speedup, (int, float))
                                                    and 1.0 < self.target_speedup < 100):
            raise ConfigError(f"--target-speedup must be a number > 1 (got {self.target_speedup})")
        if self.feedback_block is not None and self.feedback_block < 0:
            raise ConfigError(f"--feedback-block must be >= 0 (got {self.feedback_block})")
        if self.guidance is not None and not self.guidance >= 0:
            raise ConfigError(f"--guidance must be >= 0 (got {self.guidance})")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0 (got {self.warmup_steps})")
        if self.sharding == "fsdp" and not m.copies_student:
            raise ConfigError(f"--sharding fsdp does not apply to --mode {self.mode}: it trains one block's copy "
                              "beside the frozen model, which FSDP would not shrink; use --sharding ddp")
        self.train_config()  # validates the loop's fields (steps, batch, lr, accumulation ...)
        micro = self.batch_size // self.grad_accum
        if micro < 1:
            raise ConfigError(f"--batch-size {self.batch_size} / --grad-accum {self.grad_accum} leaves no rows")

    def train_config(self) -> TrainConfig:
        return TrainConfig.of(self)



# fields that may change between an interrupted run and its --resume
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "validate_every", "val_images", "device", "sharding")


@dataclass
class DistillReport:
    mode: str
    family: str
    teacher: dict  # path + weights digest
    params: int  # student transformer
    params_trained: int
    steps: int
    batch_size: int
    resumed_from: int | None
    final_loss: float
    seconds: float  # the whole op (pool, baseline, training, validation)
    train_seconds: float  # this run's training loop
    defaults: dict  # what generate / bench use for the student
    baseline: dict  # the teacher at its own defaults on the validation seeds
    validation: dict  # the student (EMA weights) at its defaults on the same seeds
    plan: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # the mode's own (pool, mapping, grid ...)
    sharding: dict = field(default_factory=dict)  # mode, processes, this process's param + optimizer state bytes

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Context:
    cfg: DistillConfig
    student: object  # the input bundle
    teacher: object  # the teacher bundle
    trainable: nn.Module  # the transformer that trains (the student's, or a copy when it is the teacher's)
    device: str
    embeddings: object = None  # (prompts, cond, uncond) for text families
    images: object = None  # (images (N, 3, H, W) in [-1, 1], labels or None) for a ground-truth loss
    log: Callable = print
    pool_progress: Callable | None = None
    store: object = None  # formats.checkpoint.CheckpointStore of the run (None: no checkpoints)
    resume: bool = False

    @property
    def micro_batch(self) -> int:
        return self.cfg.batch_size // self.cfg.grad_accum


def check_resume(stored: dict, cfg: DistillConfig, teacher_sha) -> None:
    """A --resume continues the same run: the stored config must match, up to RESUMABLE_CHANGES."""
    from ditkit.ops.config import same_run

    now = {**cfg.to_dict(), "teacher_sha256": teacher_sha}
    diff = same_run(stored, cfg, RESUMABLE_CHANGES)  # compared as configs (DistillConfig.from_dict of the stored one)
    if stored.get("teacher_sha256") != teacher_sha:
        diff.append("teacher_sha256")
    if diff:
        k = diff[0]
        raise ConfigError(f"--resume: the checkpoint was made with {k}={stored.get(k)!r}, this run has {now.get(k)!r}; "
                          "rerun with the original options, or start over with --force")


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def distill(student_bundle, cfg: DistillConfig, teacher_bundle=None, store=None, resume: bool = False,
            progress: Callable[[int, float], None] | None = None, *, embeddings=None, images=None,
            log: Callable[[str], None] | None = None, on_plan: Callable[[dict], None] | None = None,
            on_validation: Callable | None = None, pool_progress: Callable[[int], None] | None = None):
    """The distilled student bundle (not saved) and its report.

    teacher_bundle None: the student itself for modes whose teacher is "self"; modes that need another teacher
    raise. `store` (formats.checkpoint.CheckpointStore) keeps checkpoints and the JSONL log; `resume` continues
    from it. progress(step, loss) after every step; on_plan(plan) before step 1; on_validation(step, images,
    metrics) on rank 0 with every validation's images (the CLI saves the grid).
    """
    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    mode = DISTILL_MODES[cfg.mode]
    if teacher_bundle is None:
        if mode.teacher != "self":
            raise ConfigError(f"--mode {cfg.mode} needs a teacher: the student's recorded parent or --teacher BASE")
        teacher_bundle = student_bundle
    common.check_pair(student_bundle, teacher_bundle)
    device = cfg.device
    teacher_sha = teacher_bundle.parent_record()["sha256"]
    if cfg.as_lora and teacher_bundle is not student_bundle and (
            student_bundle.parent_record()["sha256"] != teacher_sha
            or _shapes(student_bundle.transformer) != _shapes(teacher_bundle.transformer)):
        raise ConfigError("--as-lora writes a LoRA over SRC, so SRC must be its own teacher; with --teacher BASE "
                          "drop --as-lora and distill the full student")
    if resume and store is not None and store.exists():
        from ditkit.formats.safetensors_check import read_json

        check_resume(read_json(store.ckpt / "state.json", "checkpoint state").get("config", {}), cfg, teacher_sha)

    # 1. the student that trains: fp32 master weights, never the teacher's own module
    trainable = student_bundle.transformer
    teacher_bundle.transformer.eval().requires_grad_(False)
    if mode.copies_student:
        if trainable is teacher_bundle.transformer:
            trainable = copy.deepcopy(trainable)
        trainable.float().requires_grad_(True)
    if cfg.as_lora:
        as_lora.train_linear_weights_only(trainable)  # the delta must live where a LoRA can carry it

    # 2. the mode builds its data (the teacher's pool) and its loss
    ctx = Context(cfg=cfg, student=student_bundle, teacher=teacher_bundle, trainable=trainable, device=device,
                  embeddings=embeddings, images=images, log=say, pool_progress=pool_progress, store=store,
                  resume=resume)
    job = mode.prepare(ctx)
    components = dict(student_bundle.components)
    if job.scheduler is not None:
        components["scheduler"] = job.scheduler
    candidate = common.with_transformer(student_bundle, job.transformer if job.transformer is not None else job.model,
                                        components, job.defaults)
    if job.feedback is not None:
        candidate.feedback = job.feedback

    # 3. validation: the teacher at its own settings once, the student at its own after training (and every N)
    has_judge = student_bundle.judge is not None and student_bundle.family.conditioning == "class"
    n_val = cfg.val_images or (100 if has_judge else 8)
    validator = common.Validator(candidate, n_val, seed=cfg.seed, device=device, embeddings=embeddings,
                                 on_images=on_validation)
    say(f"baseline: the teacher generates {n_val} validation images at its default settings")
    base = common.baseline(validator, teacher_bundle)
    if has_judge:  # the judge's scores are the measure; PSNR to the teacher is only a fallback
        validator.reference = None

    # 4. the plan, before step 1
    tcfg = cfg.train_config()
    hw = common.native_hw(student_bundle)
    mem = common.memory_estimate(job.model, teacher_bundle.transformer, student_bundle.family, hw,
                                 job.rows_per_step, job.data_bytes, cfg.ema_decay > 0, arch=job.transformer)
    trained = sum(p.numel() for p in job.model.parameters() if p.requires_grad)
    plan = {"mode": cfg.mode, **job.plan, "params_trained": trained, "steps": cfg.steps,
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "lr": cfg.lr, "ema_decay": cfg.ema_decay,
            "mixed_precision": cfg.mixed_precision, "sharding": cfg.sharding, "device": device,
            "peak_memory_estimate": common.describe_bytes(mem["total_estimate"]), "memory": mem,
            "student_defaults": job.defaults, "validation": f"{n_val} images every "
            f"{cfg.validate_every or cfg.steps} steps ({'judge' if has_judge else 'PSNR vs teacher'})"}
    if on_plan is not None:
        on_plan(plan)
    if store is not None and not resume and common.is_main():
        store.log({"step": 0, "event": "plan", "plan": plan, "baseline": base})

    # 5. train (accelerate, EMA, checkpoints, exact resume); the model ends holding the EMA weights
    record = {**cfg.to_dict(), "teacher_sha256": teacher_sha}
    try:
        result = train(job.model, job.loss_fn, tcfg, store=store, resume=resume, validate=validator,
                       on_step=progress, config_record=record, shard_units=student_bundle.family.shard_units)
    finally:
        job.close()
    job.model.requires_grad_(False).eval()

    result_out = candidate
    details = dict(job.report)
    if cfg.as_lora:
        result_out, details["lora"] = lora_form(candidate, teacher_bundle, cfg, validator, result.validation,
                                                teacher_sha, say)
    report = DistillReport(
        mode=cfg.mode, family=student_bundle.family.name,
        teacher={"path": str(teacher_bundle.path) if teacher_bundle.path else None, "sha256": teacher_sha},
        params=sum(p.numel() for p in (job.model if job.transformer is None else job.transformer).parameters()),
        params_trained=trained, steps=result.step,
        batch_size=cfg.batch_size, resumed_from=result.resumed_from, final_loss=result.final_loss,
        seconds=round(time.perf_counter() - t0, 2), train_seconds=result.seconds, defaults=job.defaults,
        baseline=base, validation=result.validation, plan=plan, details=details, sharding=result.sharding)
    return result_out, report


def lora_form(student, teacher_bundle, cfg: DistillConfig, validator, student_validation: dict, teacher_sha: str,
              say: Callable[[str], None]):
    """--as-lora: the student's weight deltas as a rank-`cfg.rank` LoRA (as_lora.delta_adapter), then base +
    LoRA validated on the same seeds as the student, with the PSNR of its images against the student's."""
    import dataclasses

    from ditkit.ops.lora import apply_lora
    from ditkit.ops.metrics import psnr

    adapter, rep = as_lora.delta_adapter(teacher_bundle.transformer, student.transformer, cfg.rank,
                                         family=student.family.name, targets=["linear"], base_sha256=teacher_sha)
    adapter.info.update(as_lora.sampling_info(student.defaults(), student.scheduler))
    adapter.info["distill"] = {"mode": cfg.mode, "student_steps": cfg.student_steps, "steps": cfg.steps,
                               "prediction": cfg.prediction, "relative_error": rep["relative_error"]}
    say(f"lora: rank {cfg.rank} over {rep['modules']} Linears, relative error {rep['relative_error']:.4f}; "
        "validating base + LoRA")
    base = dataclasses.replace(teacher_bundle, transformer=copy.deepcopy(teacher_bundle.transformer),
                               components=dict(teacher_bundle.components), manifest=dict(teacher_bundle.manifest),
                               feedback=None)
    apply_lora(base, adapter)
    ref, _ = validator.images(student)
    images, lrep = validator.images(base)
    if images is not None:
        val = {"images": int(len(images)), "steps": lrep["steps"], "guidance": lrep["guidance"]}
        if lrep["judge"] is not None:
            val.update(accuracy=lrep["judge"]["accuracy"], fd=lrep["judge"]["fd"])
        val["psnr_vs_student"] = round(psnr(images, ref), 3)
        rep["validation"] = val
    rep["student_validation"] = student_validation
    return adapter, rep


__all__ = ["DISTILL_MODES", "DistillConfig", "DistillReport", "Mode", "Job", "Context", "distill"]
