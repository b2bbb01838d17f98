"""The Inner Loop Feedback module (ILF, arXiv 2501.13107) and what a bundle carries of it: the module, its
schedule of partial steps, the fingerprint of its backbone. Sampling with it is ditkit.ops.feedback, training
ditkit.ops.distill.feedback, its file ditkit.formats.feedback.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError


class FeedbackModule(nn.Module):
    """A copy of backbone block `source` (weights and settings), gated by a scalar that starts at zero."""

    def __init__(self, block: nn.Module, source: str):
        super().__init__()
        self.block = copy.deepcopy(block)
        self.source = source
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor, *args, **kwargs):
        out = self.block(h, *args, **kwargs)
        s = self.scale.to(h.dtype)
        if isinstance(out, tuple):  # two-stream blocks (sd3, flux) return (encoder_hidden_states, hidden_states)
            e_out, h_out = out
            e_in = kwargs["encoder_hidden_states"]
            return (None if e_out is None else e_in + s * (e_out - e_in)), h + s * (h_out - h)
        return h + s * (out - h)


@dataclass
class FeedbackSchedule:
    """Which steps are partial, for one (sampler, steps); `block` is the feedback target j."""
    sampler: str
    steps: int
    num_blocks: int
    block: int
    partial: list

    def __post_init__(self):
        if len(self.partial) != self.steps:
            raise ConfigError(f"feedback schedule has {len(self.partial)} step entries for {self.steps} steps")
        if not 0 <= self.block < self.num_blocks:
            raise ConfigError(f"feedback block {self.block} is outside blocks 0..{self.num_blocks - 1}")
        if self.partial and self.partial[0]:
            raise ConfigError("a feedback schedule must run every block at step 0 (nothing to feed back yet)")

    def partial_steps(self) -> int:
        return sum(bool(p) for p in self.partial)

    def to_dict(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "num_blocks": self.num_blocks, "block": self.block,
                "partial": [bool(p) for p in self.partial]}

    @classmethod
    def from_dict(cls, d: dict) -> "FeedbackSchedule":
        try:
            return cls(sampler=str(d["sampler"]), steps=int(d["steps"]), num_blocks=int(d["num_blocks"]),
                       block=int(d["block"]), partial=[bool(p) for p in d["partial"]])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"the feedback schedule is malformed ({e!r}); re-run ditkit distill --mode feedback")


@dataclass
class Feedback:
    """What a bundle carries: the trained module and its schedule."""
    module: FeedbackModule
    schedule: FeedbackSchedule
    backbone: str = ""  # formats.feedback.fingerprint of the transformer it was trained on


def backbone_blocks(family, transformer) -> list:
    blocks = list(family.blocks(transformer)) if isinstance(transformer, nn.Module) else []
    if not blocks:
        raise ConfigError(f"feedback needs a PyTorch transformer with blocks; this {family.name} bundle's "
                          f"{type(transformer).__name__} has none (an ONNX bundle?)")
    return blocks
