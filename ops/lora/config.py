"""lora-train's config (the recommended recipe as defaults) and report."""
from __future__ import annotations

from typing import ClassVar

import math
from dataclasses import asdict, dataclass, field

from ditkit.formats.errors import ConfigError, check_options, choice_error
from ditkit.formats.lora import effective_scale
from ditkit.ops.config import OpConfig

from ..training import MIXED_PRECISION, TrainConfig
from .targets import TARGETS


@dataclass
class LoraConfig(OpConfig):
    TYPE: ClassVar[str] = "lora-train"

    rank: int = 4  # 4: a style/subject adapter; ~1-2% of the tiny defaults' transformers on attention alone
    alpha: float | None = None  # None: = rank, so the effective scale alpha/rank is 1 (always saved)
    targets: tuple[str, ...] = ("attention",)  # the usual LoRA recipe; add mlp / modulation for bigger shifts
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3  # LoRA factors start at B = 0 and are few: a higher LR than full fine-tuning
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    grad_checkpointing: bool = False
    ema_decay: float = 0.0  # off: short runs from B = 0, where an un-debiased EMA would lag the adapter
    checkpoint_every: int = 100
    validate_every: int = 0  # 0: validate once, at the end
    validation_images: int = 8
    validation_steps: int | None = None  # sampling steps of validation images; None: the model's default
    seed: int = 0
    sharding: str = "ddp"  # ops/sharding.SHARDING (fsdp: under a launcher, 2+ processes)
    trigger: str | None = None  # text families: added to every caption (or put where a caption says {trigger})
    caption_dropout: float = 0.1  # text families: share of steps' images trained on the empty prompt (CFG)
    prior_images: int = 0  # prior preservation: images the base generates itself (DreamBooth), 0 = off
    prior_weight: float = 1.0
    device: str = "cpu"

    def __post_init__(self):
        check_options(self)  # floats finite, seeds and counts in range (formats/errors.py)
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise ConfigError(f"--rank must be >= 1 (got {self.rank})")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"--alpha must be a positive number (got {self.alpha})")
        if not self.targets:
            raise ConfigError(f"--targets needs at least one of: {', '.join(TARGETS)}")
        for t in self.targets:
            if t not in TARGETS:
                raise choice_error("target", t, TARGETS)
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"--caption-dropout must be in [0, 1) (got {self.caption_dropout})")
        if self.prior_images < 0 or self.prior_weight < 0:
            raise ConfigError("--prior-images and --prior-weight must be >= 0")
        if self.validation_images < 1:
            raise ConfigError(f"--validation-images must be >= 1 (got {self.validation_images})")
        if self.trigger is not None and not self.trigger.strip():
            raise ConfigError("--trigger must be a non-empty word")
        if self.mixed_precision not in MIXED_PRECISION:
            raise choice_error("mixed precision", self.mixed_precision, MIXED_PRECISION)
        self.train_config()  # validates the shared training fields

    @property
    def scale(self) -> float:
        return effective_scale(self.alpha, self.rank)

    def train_config(self) -> TrainConfig:
        return TrainConfig.of(self)

    def fields_dict(self) -> dict:
        d = super().fields_dict()
        d["targets"] = list(self.targets)
        return d


# fields that may change between a run and its --resume
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "validate_every", "validation_images", "validation_steps",
                     "device", "sharding")


@dataclass
class LoraReport:
    family: str
    rank: int
    alpha: float
    scale: float
    targets: list
    modules: int
    adapter_params: int
    transformer_params: int
    adapter_fraction: float
    steps: int
    final_loss: float
    seconds: float
    resumed_from: int | None
    data: dict
    peak_memory_mb: dict
    base_unchanged: bool  # the base weights are bit-identical after training
    validation: dict = field(default_factory=dict)
    loss_first: float | None = None  # mean loss of the first 10% of this run's steps
    loss_last: float | None = None  # mean loss of the last 10%
    sharding: dict = field(default_factory=dict)  # mode, processes, this process's param + optimizer state bytes

    def to_dict(self) -> dict:
        return asdict(self)
