"""The training loop shared by distill and lora-train: accelerate, EMA, validation, exact resume, interrupts.

Exact resume by construction: every batch and every noise draw comes from a generator seeded by
(seed, step, micro-batch), and the global RNG is reseeded from (seed, step) each step, so a resumed run sees exactly the data an
uninterrupted one would; model, optimizer, LR scheduler and EMA tensors are restored bit for bit.
Under a multi-process launcher each rank takes its slice of the same global batch, so N processes
match one process at the same global batch size (up to float summation order).
"""
from __future__ import annotations

from typing import ClassVar

import dataclasses

import contextlib
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ditkit.formats.checkpoint import set_rng_state
from ditkit.formats.errors import ConfigError, Interrupted, check_options
from ditkit.ops.config import OpConfig

from . import sharding
from .sample import image_seed

MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainConfig(OpConfig):
    TYPE: ClassVar[str] = "train"

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
    sharding: str = "ddp"  # ops/sharding.SHARDING: ddp (whole model per process) or fsdp (sharded, FSDP2)

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
        from .sharding import check_choice

        check_choice(self.sharding, self.mixed_precision)



@dataclass
class TrainResult:
    step: int
    final_loss: float
    seconds: float
    resumed_from: int | None
    log: list = field(default_factory=list)  # rows written this run
    validation: dict = field(default_factory=dict)
    sharding: dict = field(default_factory=dict)  # mode, processes, this process's param + optimizer bytes


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
          config_record: dict | None = None, shard_units: Callable | None = None) -> TrainResult:
    """Optimise the parameters of `model` that require grad.

    loss_fn(model, generator, rank, world) -> scalar loss over this process's slice of the micro-batch
    drawn from `generator`. `store` is a formats.checkpoint.CheckpointStore (or None: no checkpoints).
    validate(step) -> metrics, called with the EMA weights in `model`.
    cfg.sharding (ops/sharding.py): "ddp" through accelerate, "fsdp" through FSDP2 on a sharded copy of `model`,
    which ends holding the full weights either way; shard_units(model) -> its FSDP units (Family.shard_units).
    """
    if cfg.grad_checkpointing and getattr(model, "_supports_gradient_checkpointing", False):
        model.enable_gradient_checkpointing()
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("nothing to train: no parameter requires grad")
    state = None
    if resume and store is not None:
        state = store.load()
        with torch.no_grad():  # the weights go in before any copy or sharding is made
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(state["trainable"][n])
    loop = _Fsdp(model, cfg, shard_units) if cfg.sharding == "fsdp" else _Accelerate(model, cfg)
    rank, world, named = loop.rank, loop.world, loop.named
    opt = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(cfg.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    ema = {n: p.detach().clone().float() for n, p in named} if cfg.ema_decay > 0 else None

    start, resumed = 0, None
    if state is not None:
        loop.load_optimizer(opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None and state["ema"] is not None:
            ema = loop.ema_from(state["ema"])
        set_rng_state(state["rng"])  # for RNG users outside the loop (the loop reseeds per step)
        start = resumed = int(state["step"])
        store.truncate_log(start)
        state = None
    model_p, opt_p = loop.prepare(opt)
    model_p.train()

    def checkpoint(step):
        if store is not None:
            saved = loop.saved(opt, ema)  # gathered on rank 0 under fsdp (every process takes part)
            if rank == 0:
                trainable, ema_full, optimizer = saved
                store.save(step=step, trainable=trainable, ema=ema_full, optimizer=optimizer,
                           scheduler=sched.state_dict(), config=config_record or cfg.to_dict())
        loop.barrier()

    rows, loss_value, t0 = [], float("nan"), time.perf_counter()
    validation: dict = {}
    with _StopFlag() as stop:
        for step in range(start, cfg.steps):
            # global RNG users inside the model (dropout, DiT's label dropout) are reseeded every step too
            torch.manual_seed(image_seed(cfg.seed + 1, step * world + rank))
            total = 0.0
            for micro in range(cfg.grad_accum):
                loss = loop.micro_step(loss_fn, model_p, opt_p, sched, batch_generator(cfg.seed, step, micro),
                                       micro)
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
                with loop.weights_for_validation(ema):
                    validation = validate(step + 1)
                model_p.train()
                row["validation"] = validation
            rows.append(row)
            if store is not None and rank == 0:
                store.log(row)
            if on_step is not None:
                on_step(step + 1, total)
            stopping = loop.any_rank(stop.signum is not None)  # every process stops at the same step
            if (step + 1) % cfg.checkpoint_every == 0 or done or stopping:
                checkpoint(step + 1)
                # a signal that came while this checkpoint was written stops here too: the step is saved
                stopping = loop.any_rank(stop.signum is not None)
            if stopping and not done:
                raise Interrupted(f"interrupted at step {step + 1}/{cfg.steps}; a checkpoint was saved: "
                                  "rerun the same command with --resume to continue")
    memory = {"mode": cfg.sharding, "processes": world, **sharding.state_bytes(model_p, opt)}
    loop.finish(ema)  # the result carries the EMA weights
    model.eval()
    return TrainResult(step=cfg.steps, final_loss=loss_value, seconds=round(time.perf_counter() - t0, 3),
                       resumed_from=resumed, log=rows, validation=validation, sharding=memory)


class _Accelerate:
    """--sharding ddp: accelerate's Accelerator (DistributedDataParallel under a launcher) on the model itself."""

    def __init__(self, model, cfg: TrainConfig):
        from accelerate import Accelerator

        self.cfg, self.model = cfg, model
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                               cpu=not torch.cuda.is_available())
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def load_optimizer(self, opt, sd):
        opt.load_state_dict(sd)

    def ema_from(self, full: dict) -> dict:
        return {n: full[n].clone() for n, _ in self.named}

    def prepare(self, opt):
        return self.acc.prepare(self.model, opt)

    def micro_step(self, loss_fn, model_p, opt_p, sched, g, micro):
        acc, cfg = self.acc, self.cfg
        with acc.accumulate(model_p):
            loss = loss_fn(model_p, g, self.rank, self.world)
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_([p for _, p in self.named], cfg.max_grad_norm)
            opt_p.step()
            sched.step() if acc.sync_gradients else None
            opt_p.zero_grad(set_to_none=True)
        return loss

    def saved(self, opt, ema):
        return {n: p for n, p in self.named}, ema, opt.state_dict()

    def barrier(self):
        self.acc.wait_for_everyone()

    def any_rank(self, flag: bool) -> bool:
        return _any_rank(flag, self.world, self.acc.device)

    @contextlib.contextmanager
    def weights_for_validation(self, ema):
        self._swap(ema)
        try:
            yield
        finally:
            self._swap(ema)

    def _swap(self, ema):
        if ema is None:
            return
        with torch.no_grad():
            for n, p in self.named:
                tmp = p.detach().clone()
                p.copy_(ema[n].to(p.dtype))
                ema[n] = tmp.float()

    def finish(self, ema):
        if ema is not None:
            with torch.no_grad():
                for n, p in self.named:
                    p.copy_(ema[n].to(p.dtype))
        self.acc.wait_for_everyone()


class _Fsdp:
    """--sharding fsdp: FSDP2 on a sharded copy of the model (ops/sharding.FsdpEngine); plain torch steps."""

    def __init__(self, model, cfg: TrainConfig, units):
        self.cfg = cfg
        self.engine = sharding.FsdpEngine(model, cfg.mixed_precision, units)
        self.rank, self.world, self.named = self.engine.rank, self.engine.world, self.engine.named
        self.device = next(self.engine.model.parameters()).device

    def load_optimizer(self, opt, sd):
        self.engine.load_optimizer(opt, sd)

    def ema_from(self, full: dict) -> dict:
        return self.engine.shard_like(full)

    def prepare(self, opt):
        return self.engine.model, opt

    def micro_step(self, loss_fn, model_p, opt, sched, g, micro):
        cfg = self.cfg
        loss = loss_fn(model_p, g, self.rank, self.world)
        (loss / cfg.grad_accum).backward()  # reduce-scattered into the gradient shards (averaged over processes)
        if micro == cfg.grad_accum - 1:
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for _, p in self.named], cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return loss

    def saved(self, opt, ema):
        e = self.engine
        trainable = e.full(dict(self.named))
        ema_full = e.full(ema) if ema is not None else None
        optimizer = e.optimizer_state(opt)
        return (trainable, ema_full, optimizer) if self.rank == 0 else None

    def barrier(self):
        import torch.distributed as dist

        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        return _any_rank(flag, self.world, self.device)

    @contextlib.contextmanager
    def weights_for_validation(self, ema):
        self.engine.fill(ema)  # the caller's module, whole, with the EMA weights: validation runs on it
        try:
            yield
        finally:
            self.engine.release()

    def finish(self, ema):
        self.engine.fill(ema)
        self.barrier()


def _any_rank(flag: bool, world: int, device) -> bool:
    """True on every process when it is True on any (a signal reaches the processes at different steps)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
