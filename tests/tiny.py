"""Tiny, random, real diffusers models of every family (2 blocks, hidden 32-64) for CPU tests."""
from __future__ import annotations

from pathlib import Path

import torch

import diffusers
from diffusers import AutoencoderKL
from ditkit.formats.embeddings import save_embeddings

PROMPTS = ["a handwritten seven", "a typed three"]


def tiny_vae(latent_channels: int) -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16)


def tiny_transformer(family: str):
    return _tiny_transformer(family).eval()


def _tiny_transformer(family: str):
    torch.manual_seed(0)
    if family == "dit":
        return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                               out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                               num_embeds_ada_norm=1000)
    if family == "pixart":
        return diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                  out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                  cross_attention_dim=32, caption_channels=24,
                                                  norm_type="ada_norm_single", num_embeds_ada_norm=1000)
    if family == "sd3":
        return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                                               num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                               joint_attention_dim=24, caption_projection_dim=32,
                                               pooled_projection_dim=16, pos_embed_max_size=16)
    if family == "flux":
        return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=None, num_layers=1,
                                                num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                                joint_attention_dim=24, pooled_projection_dim=16,
                                                guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    raise KeyError(family)


def tiny_scheduler(family: str):
    if family in ("sd3", "flux"):
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    return diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)


def tiny_embeddings(family: str, path: Path) -> Path:
    g = torch.Generator().manual_seed(2)
    n = len(PROMPTS)
    if family == "pixart":
        cond = {"prompt_embeds": torch.randn(n, 6, 24, generator=g), "prompt_attention_mask": torch.ones(n, 6, dtype=torch.long)}
        unc = {"prompt_embeds": torch.randn(n, 6, 24, generator=g), "prompt_attention_mask": torch.ones(n, 6, dtype=torch.long)}
    else:
        cond = {"prompt_embeds": torch.randn(n, 6, 24, generator=g), "pooled_prompt_embeds": torch.randn(n, 16, generator=g)}
        unc = {"prompt_embeds": torch.randn(n, 6, 24, generator=g), "pooled_prompt_embeds": torch.randn(n, 16, generator=g)}
    save_embeddings(path, PROMPTS, cond, unc if family != "flux" else None)
    return path


def write_tiny_pipeline(family: str, root: Path) -> Path:
    """A complete diffusers pipeline directory (no text encoder: prompts come from an embeddings file)."""
    tr = tiny_transformer(family)
    latent_ch = tr.config.in_channels // 4 if family == "flux" else tr.config.in_channels
    parts = dict(transformer=tr, vae=tiny_vae(latent_ch), scheduler=tiny_scheduler(family))
    if family == "dit":
        pipe = diffusers.DiTPipeline(**parts)
    elif family == "pixart":
        pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, **parts)
    elif family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(text_encoder=None, tokenizer=None, text_encoder_2=None,
                                                  tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, **parts)
    else:
        pipe = diffusers.FluxPipeline(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, **parts)
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def write_tiny_transformer(family: str, root: Path) -> Path:
    tiny_transformer(family).save_pretrained(root, safe_serialization=True)
    return root
