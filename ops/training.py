"""The training loop shared by distill and lora-train: accelerate, EMA, validation, exact resume, interrupts.

Exact resume by construction: every batch and every noise draw comes from a generator seeded by
(seed, step, micro-batch), and the global RNG is reseeded from (seed, step) each step, so a resumed run sees exactly the data an
uninterrupted one would; model, optimizer, LR scheduler and EMA tensors are restored bit for bit.
Under a multi-process launcher each rank takes its slice of the same global batch, so N processes
match one process at the same global batch size (up to float summation order).
"""
from __future__ import annotations

import dataclasses

import math
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ditkit.formats.checkpoint import set_rng_state
from ditkit.formats.errors import ConfigError, Interrupted, check_options

from .sample import image_seed

MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # global batch per optimizer step (all processes and accumulation steps together)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # bf16/fp16 on CUDA only; fp16 is known to diverge for some distillers
    grad_checkpointing: bool = False
    ema_decay: float = 0.999  # 0 disables the EMA
    checkpoint_every: int = 200
    validate_every: int = 0  # 0: only at the end
    seed: int = 0

    @classmethod
    def of(cls, op_config) -> "TrainConfig":
        """The loop's settings from an op's config (distill, lora-train), which carries them by the same names."""
        return cls(**{f.name: getattr(op_config, f.name) for f in dataclasses.fields(cls)})

    def __post_init__(self):
        check_options(self)  # floats finite, seeds and counts in range (formats/errors.py)
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"--batch-size {self.batch_size} must be divisible by --grad-accum {self.grad_accum}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number (got {self.lr})")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema-decay must be in [0, 1) (got {self.ema_decay})")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"unknown mixed precision {self.mixed_precision!r}, choose one of: {', '.join(MIXED_PRECISION)}")
        if self.checkpoint_every < 1 or self.validate_every < 0:
            raise ConfigError("--checkpoint-every must be >= 1 and --validate-every >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    step: int
    final_loss: float
    seconds: float
    resumed_from: int | None
    log: list = field(default_factory=list)  # rows written this run
    validation: dict = field(default_factory=dict)


def batch_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator that draws micro-batch `micro` of optimizer step `step` (same on every process)."""
    return torch.Generator().manual_seed(image_seed(seed, step * 1_000_003 + micro))


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and raises Interrupted."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def train(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, torch.Generator, int, int], torch.Tensor],
          cfg: TrainConfig, store=None, resume: bool = False,
          validate: Callable[[int], dict] | None = None, on_step: Callable[[int, float], None] | None = None,
          config_record: dict | None = None) -> TrainResult:
    """Optimise the parameters of `model` that require grad.

    loss_fn(model, generator, rank, world) -> scalar loss over this process's slice of the micro-batch
    drawn from `generator`. `store` is a formats.checkpoint.CheckpointStore (or None: no checkpoints).
    validate(step) -> metrics, called with the EMA weights swapped in.
    """
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      cpu=not torch.cuda.is_available())
    rank, world = acc.process_index, acc.num_processes
    if cfg.grad_checkpointing and getattr(model, "_supports_gradient_checkpointing", False):
        model.enable_gradient_checkpointing()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("nothing to train: no parameter requires grad")
    opt = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(cfg.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    ema = {n: p.detach().clone().float() for n, p in named} if cfg.ema_decay > 0 else None

    start, resumed = 0, None
    if resume and store is not None:
        state = store.load()
        with torch.no_grad():
            for n, p in named:
                p.copy_(state["trainable"][n])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None and state["ema"] is not None:
            ema = {n: state["ema"][n].clone() for n in ema}
        set_rng_state(state["rng"])  # for RNG users outside the loop (the loop reseeds per step)
        start = resumed = int(state["step"])
        store.truncate_log(start)
    model_p, opt_p = acc.prepare(model, opt)
    model_p.train()

    def checkpoint(step):
        if store is not None and acc.is_main_process:
            store.save(step=step, trainable={n: p for n, p in named}, ema=ema, optimizer=opt.state_dict(),
                       scheduler=sched.state_dict(), config=config_record or cfg.to_dict())
        acc.wait_for_everyone()

    def swap_ema():
        if ema is None:
            return
        with torch.no_grad():
            for n, p in named:
                tmp = p.detach().clone()
                p.copy_(ema[n].to(p.dtype))
                ema[n] = tmp.float()

    rows, loss_value, t0 = [], float("nan"), time.perf_counter()
    validation: dict = {}
    with _StopFlag() as stop:
        for step in range(start, cfg.steps):
            # global RNG users inside the model (dropout, DiT's label dropout) are reseeded every step too
            torch.manual_seed(image_seed(cfg.seed + 1, step * world + rank))
            total = 0.0
            for micro in range(cfg.grad_accum):
                with acc.accumulate(model_p):
                    loss = loss_fn(model_p, batch_generator(cfg.seed, step, micro), rank, world)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm)
                    opt_p.step()
                    sched.step() if acc.sync_gradients else None
                    opt_p.zero_grad(set_to_none=True)
                total += loss.detach().float().item() / cfg.grad_accum
            if ema is not None:
                with torch.no_grad():
                    for n, p in named:
                        ema[n].mul_(cfg.ema_decay).add_(p.detach().float(), alpha=1 - cfg.ema_decay)
            loss_value = total
            row = {"step": step + 1, "loss": total, "lr": sched.get_last_lr()[0]}
            done = step + 1 == cfg.steps
            if validate is not None and ((cfg.validate_every and (step + 1) % cfg.validate_every == 0) or done):
                model_p.eval()
                swap_ema()
                validation = validate(step + 1)
                swap_ema()
                model_p.train()
                row["validation"] = validation
            rows.append(row)
            if store is not None and acc.is_main_process:
                store.log(row)
            if on_step is not None:
                on_step(step + 1, total)
            if (step + 1) % cfg.checkpoint_every == 0 or done or stop.signum is not None:
                checkpoint(step + 1)
            if stop.signum is not None and not done:
                raise Interrupted(f"interrupted at step {step + 1}/{cfg.steps}; a checkpoint was saved: "
                                  "rerun the same command with --resume to continue")
    if ema is not None:  # the result carries the EMA weights
        with torch.no_grad():
            for n, p in named:
                p.copy_(ema[n].to(p.dtype))
    acc.wait_for_everyone()
    model.eval()
    return TrainResult(step=cfg.steps, final_loss=loss_value, seconds=round(time.perf_counter() - t0, 3),
                       resumed_from=resumed, log=rows, validation=validation)
