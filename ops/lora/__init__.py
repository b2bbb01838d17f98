"""LoRA for every family: lora_train(bundle, LoraConfig, data) -> (bundle with adapter, LoraReport).

Also apply_lora (load adapters into a bundle, each with its own scale), unload_lora (restore the exact base
modules) and fuse_lora (W + scale * alpha/rank * B A as new weights).
Files: targets, config, data (encode once), adapters, loss (and the memory plan), train.

Adapters go in with peft's `inject_adapter_in_model` (DiT and PixArt have no `add_adapter`); the base
weights are never written to: they stay bit-identical while training, and unloading restores the base's
exact outputs. Targets are derived from module types (TARGETS), not from model ids:
  attention   every Linear inside a diffusers attention module (q, k, v, out; the context stream's
              add_*_proj / to_add_out in MMDiT; self- and cross-attention in PixArt)
  mlp         every Linear inside a FeedForward, and the Linears owned directly by a block (Flux's
              single-stream proj_mlp / proj_out)
  modulation  the family's adaLN modulation Linears (Family.modulation)

Training is the shared loop (ops/training.py): latents (VAE posterior mean/std) and text embeddings are
computed once (encode_data); every step draws its images, noise and timesteps from the step's seeded
generator, so --resume continues exactly.
"""
from __future__ import annotations

from .adapters import (ADAPTER_NAME, _inject, adapter_names, adapter_scales, apply_lora, base_digest, extract_adapter,
                       fuse_lora, fuse_lora_, unload_lora)
from .config import RESUMABLE_CHANGES, LoraConfig, LoraReport
from .data import TRIGGER_SLOT, add_trigger, cache_key, encode_data, encode_images, native_size, strip_trigger
from .loss import estimate_peak_memory, make_loss
from .targets import TARGETS, Target, linear_modules, resolve_targets
from .train import lora_train

__all__ = ["ADAPTER_NAME", "RESUMABLE_CHANGES", "TARGETS", "TRIGGER_SLOT", "LoraConfig", "LoraReport", "Target",
           "_inject", "adapter_names", "adapter_scales", "add_trigger", "apply_lora", "base_digest", "cache_key",
           "encode_data", "encode_images", "estimate_peak_memory", "extract_adapter", "fuse_lora", "fuse_lora_", "linear_modules",
           "lora_train", "make_loss", "native_size", "resolve_targets", "strip_trigger", "unload_lora"]
