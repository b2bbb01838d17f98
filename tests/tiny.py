"""Tiny, random, real diffusers models of every family (2 blocks, hidden 32-64) for CPU tests.

Everything family-specific comes from the family adapter (formats/families/): `tiny_config()` for the
transformer, `prediction` for the scheduler, `dummy_cond` for the prompt embeddings, `pipeline_class` for the
pipeline directory. A new family needs nothing here.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

import diffusers
from diffusers import AutoencoderKL
from ditkit.formats.embeddings import save_embeddings
from ditkit.formats.families import get_family

PROMPTS = ["a handwritten seven", "a typed three"]
EMBEDDING_TOKENS = 6  # shorter than the adapters' dummy inputs (8): prompts and traced shapes differ


def tiny_vae(latent_channels: int, cls=AutoencoderKL):
    """A tiny VAE of the class the pipeline declares (AutoencoderKL; Sana's DC-AE, AutoencoderDC), 2x downscale."""
    torch.manual_seed(1)
    if cls is diffusers.AutoencoderDC:
        return cls(in_channels=3, latent_channels=latent_channels, attention_head_dim=2,
                   encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
                   encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                   encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                   encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
                   upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                   scaling_factor=0.41407)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16)


def tiny_transformer(family: str):
    fam = get_family(family)
    torch.manual_seed(0)
    return fam.init_unset_(fam.transformer_cls()(**fam.tiny_config())).eval()


def tiny_scheduler(family: str):
    if get_family(family).prediction == "flow":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    return diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)


def tiny_embeddings(family: str, path: Path) -> Path:
    """Precomputed prompt embeddings (cond, and uncond where the family uses guidance) for the tiny model."""
    fam = get_family(family)
    with torch.random.fork_rng(devices=[]):  # building the model seeds the global generator: leave it as it was
        tr = tiny_transformer(family)
    g = torch.Generator().manual_seed(2)
    n = len(PROMPTS)
    cond = fam.dummy_cond(tr, n, g, tokens=EMBEDDING_TOKENS)
    unc = fam.dummy_cond(tr, n, g, tokens=EMBEDDING_TOKENS)
    save_embeddings(path, PROMPTS, cond, unc if fam.uses_cfg(tr, fam.default_guidance) else None)
    return path


def write_tiny_pipeline(family: str, root: Path) -> Path:
    """A complete diffusers pipeline directory (no text encoder: prompts come from an embeddings file)."""
    fam, tr = get_family(family), tiny_transformer(family)
    cls = getattr(diffusers, fam.pipeline_class)
    vae_cls = inspect.signature(cls.__init__).parameters["vae"].annotation  # the pipeline's own VAE class
    vae_cls = vae_cls if isinstance(vae_cls, type) else AutoencoderKL
    parts = dict(transformer=tr, vae=tiny_vae(fam.latent_channels(tr), vae_cls), scheduler=tiny_scheduler(family))
    others = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", *parts)]
    pipe = cls(**parts, **dict.fromkeys(others))  # text encoders, tokenizers and the like: none
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def write_tiny_transformer(family: str, root: Path) -> Path:
    tiny_transformer(family).save_pretrained(root, safe_serialization=True)
    return root
