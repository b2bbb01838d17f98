"""What the cache methods share: the block chain as one residual (ditkit's methods), diffusers' hooks with a cache
context around each call (the methods diffusers has), and a meter of the block work that really ran.

The block chain: every block list of the family (`Family.stacks`, in execution order) maps (hidden states,
encoder hidden states) to new ones; diffusers' `TransformerBlockRegistry` says where each block class returns
which stream (the registration diffusers' own cache hooks use, so every family's blocks are known the same way).
Over the whole chain, h_out = h_in + R_h (and e_out = e_in + R_e for two-stream blocks). `StackCache` lets a
method replace the chain at a step by `h_in + R_h'` (block 0 returns the replacement, the other blocks pass their
inputs through), and shows the method each call's chain input and residual.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from ditkit.formats.errors import ConfigError


def chain_blocks(family, transformer) -> list[nn.Module]:
    if not hasattr(transformer, "modules"):
        raise ConfigError(f"cache needs a PyTorch transformer with blocks; this {family.name} bundle's "
                          f"{type(transformer).__name__} has none (an ONNX bundle?)")
    return [b for s in family.stacks for b in getattr(transformer, s.attr)]


def hookable_chain(family, transformer) -> list[nn.Module]:
    """The blocks a head-to-tail cache hook of diffusers (FirstBlockCache, MagCache) may span: the chain without a
    last block built differently (`Stack.keep_last`: SD3's context_pre_only block returns no text stream, on
    which diffusers' tail hook fails); that block then runs at every step after the cached span."""
    out = []
    for s in family.stacks:
        blocks = list(getattr(transformer, s.attr))
        out += blocks[:-1] if s.keep_last and len(blocks) >= 2 else blocks
    return out


def block_metadata(block: nn.Module, family=None):
    """diffusers' metadata of a block class (where it returns its streams); a class diffusers does not list is
    registered from its family's `block_returns`, so diffusers' own hooks can drive it too."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    try:
        return TransformerBlockRegistry.get(type(block))
    except (ValueError, KeyError) as e:
        if family is None or family.block_returns is None:
            raise ConfigError(f"cache: diffusers registers no block metadata for {type(block).__name__} ({e})") from e
    hidden, encoder = family.block_returns
    TransformerBlockRegistry.register(model_class=type(block), metadata=TransformerBlockMetadata(
        return_hidden_states_index=hidden, return_encoder_hidden_states_index=encoder))
    return TransformerBlockRegistry.get(type(block))


class _Replace(Exception):
    """Raised inside block 0 (by a probe) to stop it and replace the chain."""

    def __init__(self, h, e):
        super().__init__()
        self.h, self.e = h, e


class StackCache:
    """The block chain of one transformer as one residual.

    `decide(h_in, e_in) -> (h, e) or None` runs before block 0 (None: run the chain); a probe that needs block 0's
    inner inputs may raise `replace(h, e)` from inside it instead. `record(h_in, e_in, r_h, r_e)` sees every fully
    run chain. `blocks_run` counts the block calls that ran."""

    def __init__(self, family, transformer):
        self.family, self.transformer = family, transformer
        self.blocks = chain_blocks(family, transformer)
        if not self.blocks:
            raise ConfigError(f"cache: the {family.name} transformer has no blocks")
        self.meta = [block_metadata(b, family) for b in self.blocks]
        self.decide: Callable | None = None
        self.record: Callable | None = None
        self.blocks_run = 0
        self._skipping = False
        self._in = (None, None)

    @staticmethod
    def replace(h, e):
        raise _Replace(h, e)

    def _io(self, i, args, kwargs):
        m = self.meta[i]
        h = m._get_parameter_from_args_kwargs(m.hidden_states_argument_name, args, kwargs)
        e = None
        if m.return_encoder_hidden_states_index is not None:
            e = m._get_parameter_from_args_kwargs(m.encoder_hidden_states_argument_name, args, kwargs)
        return h, e

    def _pack(self, i, h, e):
        m = self.meta[i]
        if m.return_encoder_hidden_states_index is None:
            return h
        out = [None, None]
        out[m.return_hidden_states_index], out[m.return_encoder_hidden_states_index] = h, e
        return tuple(out)

    def _unpack(self, i, out):
        m = self.meta[i]
        if m.return_encoder_hidden_states_index is None:
            return (out[m.return_hidden_states_index] if isinstance(out, tuple) else out), None
        return out[m.return_hidden_states_index], out[m.return_encoder_hidden_states_index]

    @contextmanager
    def hooked(self):
        for i, block in enumerate(self.blocks):
            block.forward = self._wrap(i, block.forward)
        try:
            yield self
        finally:
            for block in self.blocks:
                del block.forward  # back to the class's forward

    def _wrap(self, i, orig):
        last = len(self.blocks) - 1

        def forward(*args, **kwargs):
            h, e = self._io(i, args, kwargs)
            if i == 0:
                self._skipping, self._in = False, (h, e)
                rep = self.decide(h, e) if self.decide is not None else None
                if rep is None:
                    try:
                        out = orig(*args, **kwargs)
                    except _Replace as r:
                        rep = (r.h, r.e)
                if rep is not None:
                    self._skipping = True
                    return self._pack(i, rep[0], rep[1] if rep[1] is not None else e)
            elif self._skipping:
                return self._pack(i, h, e)  # the replacement flows through
            else:
                out = orig(*args, **kwargs)
            self.blocks_run += 1
            if i == last and self.record is not None:
                h0, e0 = self._in
                ho, eo = self._unpack(i, out)
                r_e = eo - e0 if (eo is not None and e0 is not None and eo.shape == e0.shape) else None
                self.record(h0, e0, ho - h0, r_e)
            return out
        return forward


class WorkMeter:
    """Multiply-accumulates of the Linear layers inside the blocks that really ran (forward pre-hooks, which
    fire under any method's hooks): the share of block work a method leaves, for the cost model."""

    def __init__(self, family, transformer):
        self.macs = 0
        self._handles = []
        for block in chain_blocks(family, transformer):
            for mod in block.modules():
                if isinstance(mod, nn.Linear):
                    self._handles.append(mod.register_forward_pre_hook(self._count))

    def _count(self, mod, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor):
            self.macs += (x.numel() // max(mod.in_features, 1)) * mod.in_features * mod.out_features

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles = []


def hooked_predict(bundle, guidance: float, steps: int, apply: Callable, hook_names: tuple[str, ...],
                   on_step: Callable | None = None):
    """A fresh `predict(x, t, cond)` for one denoise run of `steps` calls under diffusers hooks: `apply(transformer)`
    registers them at the first call, every call runs inside a cache context (what CacheMixin.cache_context does;
    DiT, PixArt and SD3 lack CacheMixin, and ditkit's sampler batches cond and uncond rows into one call, so one
    context "cond" holds the state), and the hooks are removed after the last call so that the transformer is the
    plain model again. `on_step(i, t)` runs before each call (the timestep callback PAB reads)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    fam, tr = bundle.family, bundle.transformer
    state = {"step": 0}

    def remove():
        reg = HookRegistry.check_if_exists_or_initialize(tr)
        for name in hook_names:
            reg.remove_hook(name, recurse=True)
        reg.invalidate_child_registries_cache()

    def predict(x, t, cond):
        i = state["step"]
        state["step"] = i + 1
        if i == 0:
            apply(tr)
            HookRegistry.check_if_exists_or_initialize(tr).invalidate_child_registries_cache()
        if on_step is not None:
            on_step(i, t)
        try:
            _set_cache_context(tr, CacheContext("cond", step_index=i, num_inference_steps=steps,
                                                timestep=t.flatten()[0]))
            out = fam.predict(tr, x, t, cond, guidance)
            _set_cache_context(tr, None)
        except BaseException:
            remove()
            raise
        if i == steps - 1:
            remove()
        return out
    return predict
