"""What every family adapter knows. One subclass per family file; the registry is in __init__.py.

A new family is one file here plus one line in `FAMILIES`. The file defines a `Family` subclass and one
instance of it, `FAMILY`, and provides:

- the fields below without a default: names (registry name, diffusers transformer and pipeline classes),
  conditioning ("class" / "text"), prediction ("epsilon" / "flow"), samplers and sampling defaults, and the
  attribute of its block list;
- `predict` (one transformer call on (B, C, h, w) latents) and `dummy_cond` (random conditions of the right
  shapes); text families also `encode_prompts`; class families `null_cond`;
- where they differ from the defaults here: `stacks` (the block lists depth pruning removes from, with their
  config fields), `width` (what width pruning must be told beside the coupling Torch-Pruning's graph
  finds, formats/families/coupling.py; None refuses width pruning), `full_precision` and `modulation`
  (module-name regexes for quantize and LoRA), `mlp_types` (its MLP classes, LoRA's `mlp` target),
  `two_stream` (blocks that carry a text stream beside the image stream), `gguf_keep_float` (tensors a GGUF
  file keeps in F32), `onnx_unsupported` (why ONNX export refuses), `onnx_fixed_batch` (why its graph is
  traced at batch 1) and the `onnx_tracing` context (what the trace needs patched, e.g. complex RoPE),
  `cache_probe` (the first block's attention submodule, which step caching's TeaCache indicator reads),
  `block_returns` (what a block class diffusers' hooks do not know returns), `context_plan` (where
  `--parallel context` splits and gathers the image tokens; None refuses it), and the
  methods `latent_channels`, `latent_size`, `image_tokens`, `hidden_size`, `uses_cfg`, `width_unsupported`,
  `depth_config`, `config_from_state` (and, for MLP-only width pruning, `mlp_hidden`, `mlp_multiple`,
  `mlp_config`);
- `tiny_config()` (and `init_unset_` where the constructor leaves a parameter unset): the constructor arguments
  of a tiny random model (2 blocks, hidden 32-64) that the test
  suite builds for every registered family.

tests/test_families.py checks that every registered family provides these and that every table keyed by
family covers it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .coupling import WidthSpec

Cond = dict  # name -> tensor with the batch on dim 0 (labels, prompt embeddings, masks, pooled)


@dataclass(frozen=True)
class Stack:
    """One list of transformer blocks, as depth pruning and distillation see it."""
    attr: str  # the ModuleList on the transformer
    config_key: str  # the config field holding its length
    keep_last: bool = False  # the last block is built differently (SD3's context_pre_only), so it stays


@dataclass(frozen=True)
class ContextPlan:
    """Where one image's tokens are split across processes and gathered again (`--parallel context`,
    ops/parallel.py). Between the two points every layer is per token except attention, whose keys and values
    each process gathers from the others."""
    # the module whose output (B, N, D) holds the embedded image tokens (patch embedding + positions); or, with
    # `split_inputs`, "" and the transformer's own inputs split instead: (keyword, sequence dim) pairs
    split: str = "pos_embed"
    split_inputs: tuple[tuple[str, int], ...] = ()
    gather: str = "norm_out"  # the module whose output (B, N_local, D) is gathered before the final projection
    attention: str = r"\.attn1?$"  # module-name regex: the attention layers whose keys cover the image tokens
    # where a joint attention puts the (replicated) text tokens in its key sequence: "none", "first" or "last"
    text: str = "none"


@dataclass(frozen=True)
class Family:
    name: str
    transformer_class: str  # diffusers class name, as in config.json's "_class_name"
    pipeline_class: str  # the diffusers pipeline that saves / loads this family
    conditioning: str  # "class" or "text"
    prediction: str  # "epsilon" (DDPM family) or "flow" (flow matching)
    samplers: tuple[str, ...]
    default_sampler: str
    default_steps: int
    default_guidance: float
    blocks_attr: str  # the ModuleList of transformer blocks
    # module-name regexes that stay in full precision (embeddings, modulation producers, final projection)
    full_precision: tuple[str, ...] = ()
    modulation: tuple[str, ...] = ()  # module-name regexes of adaLN modulation linears
    # the MLP module classes of its blocks (in diffusers.models.attention): the LoRA `mlp` target's Linears
    mlp_types: tuple[str, ...] = ("FeedForward",)
    vae_scale_fallback: int = 8  # latent downscale when a bundle has no VAE
    # block lists in execution order (depth pruning, distillation's block mapping); None: blocks_attr alone,
    # its length in the config's num_layers; () refuses depth pruning
    stacks: tuple[Stack, ...] | None = None
    width: WidthSpec | None = None  # width pruning's declarations (ops/prune/graph.py); None refuses it
    two_stream: bool = False  # blocks take and return (text, image) streams (MMDiT), not hidden states alone
    # the authors' single-file key layout: (its name, the key table of formats/original_keys.py), or None
    original_layout: tuple | None = None
    # GGUF: key prefixes (in the file's layout) kept in F32 whatever the quant type (city96's keep-float lists:
    # the embedders in, the final layer out); general.architecture is the family name
    gguf_keep_float: tuple[str, ...] = ()
    # why torch.export cannot trace the transformer at all (ONNX export refuses), or None
    onnx_unsupported: str | None = None
    # why its graph cannot take a dynamic batch (the export is then traced at batch 1 and onnxruntime runs a
    # batch row by row), or None: a dynamic batch axis
    onnx_fixed_batch: str | None = None
    # the first block's attention submodule, whose input is the timestep-modulated, normalized hidden states
    # (TeaCache's indicator, ops/cache/teacache.py)
    cache_probe: str = "attn1"
    # where a block class that diffusers' TransformerBlockRegistry does not list returns its hidden states and
    # its encoder hidden states (an index, or None): (0, None) for a block returning the hidden states alone
    block_returns: tuple | None = None
    # how `--parallel context` splits one image across processes (ops/parallel.py); None refuses it
    context_plan: ContextPlan | None = None

    def __post_init__(self):
        if self.stacks is None:
            object.__setattr__(self, "stacks", (Stack(self.blocks_attr, "num_layers"),))

    # -- identification ----------------------------------------------------------------------
    def detect(self, config: dict) -> bool:
        return config.get("_class_name") == self.transformer_class

    def transformer_cls(self):
        import diffusers

        return getattr(diffusers, self.transformer_class)

    def config_from_state(self, state: dict) -> dict | None:
        """The transformer config read from a bare state dict's keys and shapes, or None when they do not
        determine it (a single .safetensors file then needs --config)."""
        return None

    # -- conventions the config does not hold ---------------------------------------------------
    def conventions(self, transformer: nn.Module) -> dict:
        """Settings of the model that its diffusers config does not hold (DiT: the timestep embedding's
        frequency shift); the manifest records them and loading applies them (`apply_conventions`)."""
        return {}

    def apply_conventions(self, transformer: nn.Module, conventions: dict) -> None:
        """Set what `conventions` (a manifest's record) says on a freshly built transformer."""

    # -- structure -----------------------------------------------------------------------------
    def blocks(self, transformer: nn.Module) -> nn.ModuleList:
        return getattr(transformer, self.blocks_attr)

    def shard_units(self, transformer: nn.Module) -> list[nn.Module]:
        """What `--sharding fsdp` shards as units, innermost first (ops/sharding.py; the root is the last unit):
        every block of the stacks. A family whose forward calls a block's submodule from outside that block's own
        forward lists the submodule too (before its block), so that it is gathered when it runs."""
        return [b for s in self.stacks if hasattr(transformer, s.attr) for b in getattr(transformer, s.attr)]

    def is_full_precision(self, module_name: str) -> bool:
        return any(re.search(p, module_name) for p in self.full_precision)

    def is_modulation(self, module_name: str) -> bool:
        return any(re.search(p, module_name) for p in self.modulation)

    def depth_config(self, transformer: nn.Module, renumber: dict[str, dict[int, int]]) -> dict:
        """Config fields besides the stacks' lengths that change when blocks go (renumber: stack attr ->
        old index -> new index of the kept blocks)."""
        return {}

    def hidden_size(self, transformer: nn.Module) -> int:
        """The residual width D (activation estimates)."""
        c = transformer.config
        return int(c.num_attention_heads * c.attention_head_dim)

    def mlp_hidden(self, transformer: nn.Module) -> int:
        """MLP hidden units per block, as diffusers builds them from the config (width pruning's 'F' groups)."""
        return self.width.mlp_mult * self.hidden_size(transformer)

    def mlp_multiple(self, transformer: nn.Module) -> int:
        """The MLP hidden width a config can write is a multiple of this (MLP-only width pruning rounds down)."""
        return 1

    def mlp_config(self, transformer: nn.Module, hidden: int) -> dict:
        """Config fields that make diffusers build every MLP with `hidden` units, the width D unchanged (width
        pruning of a family whose WidthSpec is mlp_only)."""
        raise NotImplementedError(f"{self.name} declares no MLP width field")

    def width_unsupported(self, transformer: nn.Module) -> str | None:
        """Why this transformer (a variant of the family) cannot be width-pruned, or None."""
        return None

    # -- shapes ------------------------------------------------------------------------------
    def latent_channels(self, transformer: nn.Module) -> int:
        return transformer.config.in_channels

    def latent_size(self, transformer: nn.Module) -> int:
        """Default latent side (the checkpoint's native resolution)."""
        return transformer.config.sample_size

    def image_tokens(self, transformer: nn.Module, hw: tuple[int, int]) -> int:
        """Image tokens of one transformer call at latent size hw (memory and distill estimates)."""
        p = getattr(getattr(transformer, "config", None), "patch_size", 1) or 1
        return (hw[0] // p) * (hw[1] // p)

    # -- conditioning ------------------------------------------------------------------------
    def uses_cfg(self, transformer: nn.Module, guidance: float) -> bool:
        return guidance > 1.0

    def null_cond(self, transformer: nn.Module, cond: Cond) -> Cond:
        raise NotImplementedError

    def dummy_cond(self, transformer: nn.Module, batch: int, generator: torch.Generator, tokens: int = 8) -> Cond:
        """Random conditions of the right shapes (`tokens` text tokens for text families)."""
        raise NotImplementedError

    def encode_prompts(self, pipe, prompts: list[str], device) -> tuple[Cond, Cond]:
        """(cond, uncond) for prompts, through the diffusers pipeline's own encode_prompt."""
        raise NotImplementedError(f"{self.name} is not text-conditioned")

    # -- the call --------------------------------------------------------------------------------
    def predict(self, transformer: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Cond,
                guidance: float = 1.0) -> torch.Tensor:
        """Model output with the latents' shape (B, C, h, w): epsilon or flow velocity."""
        raise NotImplementedError

    def dummy_inputs(self, transformer: nn.Module, batch: int, latent_hw: tuple[int, int] | None = None,
                     seed: int = 0):
        """(latents, t, cond) for timing, tracing, calibration and export."""
        g = torch.Generator().manual_seed(seed)
        h, w = latent_hw or (self.latent_size(transformer),) * 2
        p = next(transformer.parameters())
        latents = torch.randn(batch, self.latent_channels(transformer), h, w, generator=g).to(p.device, p.dtype)
        t = torch.full((batch,), 500.0 if self.prediction == "epsilon" else 0.5 * 1000).to(p.device)
        cond = {k: v.to(p.device) for k, v in self.dummy_cond(transformer, batch, g).items()}
        cond = {k: (v.to(p.dtype) if v.is_floating_point() else v) for k, v in cond.items()}
        return latents, t, cond

    def onnx_tracing(self):
        """A context around torch.export of the transformer: what the trace needs changed (ONNX has no complex
        tensors: a complex input travels as torch.view_as_real, and the code that reads it must take that)."""
        import contextlib

        return contextlib.nullcontext()

    # -- tests -----------------------------------------------------------------------------------
    def init_unset_(self, transformer: nn.Module) -> nn.Module:
        """Fill the parameters the diffusers constructor leaves as torch.empty (a checkpoint always sets them), so
        that a model built from tiny_config() is deterministic and finite."""
        return transformer

    def tiny_config(self) -> dict:
        """Constructor arguments of a tiny random model of this family (2 blocks, hidden 32-64) for CPU tests."""
        raise NotImplementedError(f"{self.name} has no tiny_config")


def masked_text_cond(batch: int, tokens: int, dim: int, generator: torch.Generator) -> Cond:
    """Random prompt embeddings with an all-ones mask: the dummy conditions of the families that take
    (prompt_embeds, prompt_attention_mask) (PixArt's T5, Sana's and Lumina's Gemma)."""
    return {"prompt_embeds": torch.randn(batch, tokens, dim, generator=generator),
            "prompt_attention_mask": torch.ones(batch, tokens, dtype=torch.long)}


def encode_masked(pipe, prompts: list[str], device, **kwargs) -> tuple[Cond, Cond]:
    """(cond, uncond) from a pipeline whose encode_prompt returns (embeds, mask, negative embeds, negative mask)."""
    pe, pm, npe, npm = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="",
                                          device=device, **kwargs)
    return ({"prompt_embeds": pe, "prompt_attention_mask": pm},
            {"prompt_embeds": npe, "prompt_attention_mask": npm})


def split_learned_sigma(out: torch.Tensor, channels: int) -> torch.Tensor:
    """DiT / PixArt checkpoints may predict (eps, variance): keep eps."""
    if out.shape[1] == 2 * channels:
        return out[:, :channels]
    return out
