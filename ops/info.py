"""info(bundle, InfoConfig) -> (bundle, InfoReport): what a checkpoint is, its size and its cost per step."""
from __future__ import annotations

from typing import ClassVar

from dataclasses import asdict, dataclass, field

import torch

from ditkit.formats import quantized
from ditkit.formats.errors import ConfigError, check_options
from ditkit.ops.config import OpConfig

from .flops import count_flops
from .geometry import latent_hw, vae_scale


@dataclass
class InfoConfig(OpConfig):
    TYPE: ClassVar[str] = "info"

    height: int | None = None  # pixels; default: native resolution
    width: int | None = None
    batch: int = 1  # FLOPs are counted for one transformer call at this batch

    def __post_init__(self):
        check_options(self)  # floats finite, seeds and counts in range (formats/errors.py)
        if self.batch < 1:
            raise ConfigError(f"--batch must be >= 1 (got {self.batch})")
        if self.batch > 4096:  # the count runs one real forward at this batch
            raise ConfigError(f"--batch must be at most 4096 (got {self.batch})")


@dataclass
class InfoReport:
    path: str | None
    family: str
    kind: str
    pipeline_class: str | None
    components: list[str]
    params: int  # transformer
    params_total: int  # every module in the bundle
    dtype: str
    disk_bytes: int  # transformer weights
    disk_bytes_total: int
    height: int
    width: int
    latent_shape: list[int]
    num_blocks: int
    flops_per_step: int  # one transformer call, batch `batch`, counted with torch's FlopCounterMode
    defaults: dict = field(default_factory=dict)
    op: str | None = None
    lineage: list = field(default_factory=list)
    has_judge: bool = False
    acceleration: dict | None = None  # the step-caching policy (ditkit cache) or feedback module it carries

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(module) -> int:
    """Parameters as the float model has them (a quantized model counts its int8/4-bit weights too:
    torch.ao keeps them outside .parameters(), bitsandbytes stores 4-bit weights packed)."""
    if quantized.is_quantized(module):
        return quantized.param_count(module)
    return sum(p.numel() for p in module.parameters())


def info(bundle, cfg: InfoConfig):
    hw = latent_hw(bundle, cfg.height, cfg.width)
    s = vae_scale(bundle)
    modules = [bundle.transformer] + [c for c in bundle.components.values() if isinstance(c, torch.nn.Module)]
    report = InfoReport(
        path=str(bundle.path.resolve()) if bundle.path else None,
        family=bundle.family.name, kind=bundle.kind, pipeline_class=bundle.pipeline_class,
        components=sorted(bundle.components), params=count_params(bundle.transformer),
        params_total=sum(count_params(m) for m in modules),
        dtype=str(next(bundle.transformer.parameters()).dtype).replace("torch.", ""),
        disk_bytes=bundle.transformer_bytes_on_disk(), disk_bytes_total=bundle.bytes_on_disk(),
        height=hw[0] * s, width=hw[1] * s,
        latent_shape=[bundle.family.latent_channels(bundle.transformer), *hw],
        num_blocks=len(bundle.family.blocks(bundle.transformer)),
        flops_per_step=count_flops(bundle, cfg.batch, hw),
        defaults=bundle.defaults(), op=bundle.manifest.get("op"), lineage=bundle.manifest.get("lineage", []),
        has_judge=bundle.judge is not None, acceleration=acceleration(bundle))
    return bundle, report


def acceleration(bundle) -> dict | None:
    """What makes the bundle's steps cheaper at its own settings: a cache policy or a feedback module."""
    fb = getattr(bundle, "feedback", None)
    if fb is not None:
        s = fb.schedule
        return {"kind": "feedback", "sampler": s.sampler, "steps": s.steps, "partial_steps": s.partial_steps(),
                "block": s.block, "params": sum(p.numel() for p in fb.module.parameters())}
    from .cache import bundle_policy

    policy = bundle_policy(bundle)  # validated: a malformed policy is a ConfigError, not a crash
    if policy is not None:
        d = {"kind": "cache", "method": policy.method, "sampler": policy.sampler, "steps": policy.steps}
        if policy.method == "blocks":
            d["skipped_block_steps"] = sum(r[1] - r[0] for r in policy.params["skip"] if r is not None)
        return d
    return None
