"""A step-caching policy and how a sampler applies it (generate and bench, through ops.accelerators).

How caching works (FORA / Delta-DiT style): a DiT block maps hidden states to hidden states, h -> h + d.
At every step where block i runs, its residual delta d_i = out_i - in_i is kept. At a step where the
policy skips blocks [a, b), those blocks are not run: each adds its last kept delta instead (for a range
whose deltas come from the same step the sum telescopes to out_{b-1} - in_a, Delta-DiT's cached
deviation). Step 0 always runs every block.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ditkit.formats.errors import ConfigError
from ditkit.formats.families import FAMILIES


@dataclass
class CachePolicy:
    """Which blocks each step skips: skip[i] = [a, b) block range reused at step i, or None (all run)."""
    sampler: str
    steps: int
    num_blocks: int
    skip: list

    def __post_init__(self):
        if len(self.skip) != self.steps:
            raise ConfigError(f"cache policy has {len(self.skip)} step entries for {self.steps} steps")
        for r in self.skip:
            if r is not None and not (0 <= r[0] < r[1] <= self.num_blocks):
                raise ConfigError(f"cache policy range {r} is outside blocks 0..{self.num_blocks}")
        if self.skip and self.skip[0] is not None:
            raise ConfigError("cache policy must run every block at step 0 (nothing is cached yet)")

    def skipped_blocks(self) -> int:
        return sum(r[1] - r[0] for r in self.skip if r is not None)

    def to_dict(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "num_blocks": self.num_blocks,
                "skip": [None if r is None else [int(r[0]), int(r[1])] for r in self.skip]}

    @classmethod
    def from_dict(cls, d: dict) -> "CachePolicy":
        try:
            return cls(sampler=d["sampler"], steps=int(d["steps"]), num_blocks=int(d["num_blocks"]),
                       skip=[None if r is None else (int(r[0]), int(r[1])) for r in d["skip"]])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"the manifest's cache policy is malformed ({e!r}); re-run ditkit cache")


class BlockCache:
    """Per-block residual deltas and the block range to skip on the next call."""

    def __init__(self, family, transformer):
        self.family, self.transformer = family, transformer
        self.blocks = list(family.blocks(transformer)) if hasattr(transformer, "modules") else []
        if not self.blocks:
            raise ConfigError(f"cache needs a PyTorch transformer with blocks; {family.name} bundle "
                              f"{type(transformer).__name__} has none (an ONNX bundle?)")
        self.deltas: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.skip: tuple[int, int] | None = None
        self.record = True

    @contextmanager
    def hooked(self):
        """Every block runs through `_run` while inside (instance-level forward wrappers, removed after)."""
        saved = [block.__dict__.get("forward") for block in self.blocks]  # a compiled forward (ops.compile)
        for i, block in enumerate(self.blocks):
            block.forward = self._wrap(i, block.forward)
        try:
            yield self
        finally:
            for block, prev in zip(self.blocks, saved):
                if prev is None:
                    del block.forward  # back to the class's forward
                else:
                    block.forward = prev

    def _wrap(self, i, orig):
        def forward(*args, **kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            d = self.deltas[i]
            if self.skip is not None and self.skip[0] <= i < self.skip[1] and d is not None and d.shape == h.shape:
                return h + d
            out = orig(*args, **kwargs)
            if not isinstance(out, torch.Tensor) or out.shape != h.shape:
                one_stream = ", ".join(n for n, f in FAMILIES.items() if not f.two_stream)
                raise ConfigError(f"cache supports families whose blocks map hidden states to hidden states "
                                  f"({one_stream}); the {self.family.name} family's blocks return "
                                  f"{type(out).__name__}")
            if self.record:
                self.deltas[i] = out - h
            return out
        return forward


def cached_predict(bundle, policy: CachePolicy, guidance: float):
    """A fresh stateful `predict(x, t, cond)` for ops.sample.denoise that applies `policy` step by step.
    Make one per denoise call (it counts the calls as step indices)."""
    fam, tr = bundle.family, bundle.transformer
    bc = BlockCache(fam, tr)
    if len(bc.blocks) != policy.num_blocks:
        raise ConfigError(f"the cache policy is for {policy.num_blocks} blocks, the transformer has "
                          f"{len(bc.blocks)}: re-run ditkit cache on this model")
    state = {"step": 0}

    def predict(x, t, cond):
        i = state["step"]
        bc.skip = policy.skip[i] if i < len(policy.skip) else None
        state["step"] = i + 1
        with bc.hooked():
            return fam.predict(tr, x, t, cond, guidance)
    return predict


@dataclass
class MethodPolicy:
    """A calibrated cache method for one (sampler, steps): its name (ops/cache/methods) and settings."""
    method: str
    sampler: str
    steps: int
    num_blocks: int
    params: dict

    def to_dict(self) -> dict:
        d = {"method": self.method, "sampler": self.sampler, "steps": self.steps, "num_blocks": self.num_blocks,
             "params": self.params}
        if self.method == "blocks":  # the per-step ranges also where earlier readers look for them
            d["skip"] = self.params["skip"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MethodPolicy":
        from .methods import CACHE_METHODS

        name = d.get("method", "blocks") if isinstance(d, dict) else None
        if name not in CACHE_METHODS:
            raise ConfigError(f"the manifest's cache policy names method {name!r}, which this ditkit does not "
                              f"have ({', '.join(CACHE_METHODS)}); re-run ditkit cache")
        if name == "blocks" and "params" not in d:  # a policy written before methods existed
            b = CachePolicy.from_dict(d)
            return cls("blocks", b.sampler, b.steps, b.num_blocks, {"skip": b.to_dict()["skip"]})
        try:
            p = cls(method=name, sampler=d["sampler"], steps=int(d["steps"]), num_blocks=int(d["num_blocks"]),
                    params=dict(d["params"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"the manifest's cache policy is malformed ({e!r}); re-run ditkit cache")
        if name == "blocks":
            CachePolicy.from_dict({**d, "skip": p.params.get("skip")})  # validates the ranges
        return p


def bundle_policy(bundle) -> MethodPolicy | None:
    d = (bundle.manifest or {}).get("cache")
    return None if not d else MethodPolicy.from_dict(d)


def predictor_for(bundle, sampler: str, steps: int, guidance: float):
    """(a predictor factory or None, a note for reports): the bundle's policy where it fits the run."""
    from .methods import method
    from .stack import chain_blocks

    policy = bundle_policy(bundle)
    if policy is None:
        return None, None
    if (policy.sampler, policy.steps) != (sampler, steps):
        return None, {"applied": False, "method": policy.method,
                      "reason": f"policy calibrated for {policy.sampler} at {policy.steps} steps; this run is "
                                f"{sampler} at {steps}"}
    n = len(chain_blocks(bundle.family, bundle.transformer))
    if n != policy.num_blocks:
        raise ConfigError(f"the cache policy is for {policy.num_blocks} blocks, the transformer has {n}: "
                          "re-run ditkit cache on this model")
    note = {"applied": True, "method": policy.method}
    if policy.method == "blocks":
        skip = policy.params["skip"]
        note.update(skipped_block_steps=sum(r[1] - r[0] for r in skip if r is not None),
                    total_block_steps=policy.steps * policy.num_blocks)
    return method(policy.method).runtime(bundle, policy.params, steps, guidance), note
