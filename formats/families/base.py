"""What every family adapter knows. One subclass per family file; the registry is in __init__.py."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

Cond = dict  # name -> tensor with the batch on dim 0 (labels, prompt embeddings, masks, pooled)


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
    vae_scale_fallback: int = 8  # latent downscale when a bundle has no VAE

    # -- identification ----------------------------------------------------------------------
    def detect(self, config: dict) -> bool:
        return config.get("_class_name") == self.transformer_class

    def transformer_cls(self):
        import diffusers

        return getattr(diffusers, self.transformer_class)

    # -- structure -----------------------------------------------------------------------------
    def blocks(self, transformer: nn.Module) -> nn.ModuleList:
        return getattr(transformer, self.blocks_attr)

    def is_full_precision(self, module_name: str) -> bool:
        return any(re.search(p, module_name) for p in self.full_precision)

    def is_modulation(self, module_name: str) -> bool:
        return any(re.search(p, module_name) for p in self.modulation)

    # -- shapes ------------------------------------------------------------------------------
    def latent_channels(self, transformer: nn.Module) -> int:
        return transformer.config.in_channels

    def latent_size(self, transformer: nn.Module) -> int:
        """Default latent side (the checkpoint's native resolution)."""
        return transformer.config.sample_size

    # -- conditioning ------------------------------------------------------------------------
    def uses_cfg(self, transformer: nn.Module, guidance: float) -> bool:
        return guidance > 1.0

    def null_cond(self, transformer: nn.Module, cond: Cond) -> Cond:
        raise NotImplementedError

    def dummy_cond(self, transformer: nn.Module, batch: int, generator: torch.Generator) -> Cond:
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


def split_learned_sigma(out: torch.Tensor, channels: int) -> torch.Tensor:
    """DiT / PixArt checkpoints may predict (eps, variance): keep eps."""
    if out.shape[1] == 2 * channels:
        return out[:, :channels]
    return out
