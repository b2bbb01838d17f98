"""What a run's tensors look like, from a bundle and a run's settings: latent sizes, conditions, settings.

Shared by the ops that sample or time a model (generate, bench, cache, export, info, lora, prune, distill,
memory). `cfg` is any object with the GenerateConfig fields it reads (sampler, steps, guidance; labels,
prompts): ops.generate.GenerateConfig is the usual one.
"""
from __future__ import annotations

import torch

from ditkit.formats.errors import ConfigError


def settings(bundle, cfg) -> tuple[str, int, float]:
    """(sampler, steps, guidance) of a run: the config's where set, else the bundle's defaults."""
    d = bundle.defaults()
    return (cfg.sampler or d["sampler"], cfg.steps or d["steps"],
            d["guidance"] if cfg.guidance is None else cfg.guidance)


def vae_scale(bundle) -> int:
    vae = bundle.vae
    if vae is None:
        return bundle.family.vae_scale_fallback
    c = vae.config  # AutoencoderKL: block_out_channels; DC-AE (AutoencoderDC, Sana): encoder_block_out_channels
    blocks = c.get("block_out_channels") or c.get("encoder_block_out_channels")
    return 2 ** (len(blocks) - 1)


def latent_hw(bundle, height: int | None, width: int | None) -> tuple[int, int]:
    s, native = vae_scale(bundle), bundle.family.latent_size(bundle.transformer)
    return ((height // s) if height else native, (width // s) if width else native)


def conditions(bundle, cfg, device, embeddings=None):
    """(condition values, their cond rows, their uncond rows or None): labels or prompts, one row each."""
    fam, tr = bundle.family, bundle.transformer
    if fam.conditioning == "class":
        if cfg.prompts or embeddings is not None:
            what = "--prompt" if cfg.prompts else "--embeddings"
            raise ConfigError(f"the {fam.name} family is class-conditional: use --labels, not {what}")
        n_classes = tr.config.num_embeds_ada_norm
        labels = cfg.labels if cfg.labels else bundle.defaults().get("labels", list(range(min(10, n_classes))))
        bad = [l for l in labels if l >= n_classes]
        if bad:
            raise ConfigError(f"--labels {bad} out of range: this model has classes 0..{n_classes - 1}")
        cond = {"class_labels": torch.tensor(labels, device=device)}
        return labels, cond, fam.null_cond(tr, cond)
    if cfg.labels:
        raise ConfigError(f"the {fam.name} family is text-conditioned: use --prompt, not --labels")
    if embeddings is not None:
        prompts, cond, uncond = embeddings
        if cfg.prompts:
            missing = [p for p in cfg.prompts if p not in prompts]
            if missing:
                raise ConfigError(f"prompt {missing[0][:80]!r} is not in the embeddings file; its prompts: "
                                  f"{[p[:40] for p in prompts[:5]]}")
            rows = [prompts.index(p) for p in cfg.prompts]
            cond = {k: v[rows] for k, v in cond.items()}
            uncond = None if uncond is None else {k: v[rows] for k, v in uncond.items()}
            prompts = list(cfg.prompts)
        return prompts, cond, uncond
    prompts = list(cfg.prompts or bundle.defaults().get("prompts") or [])  # default: the bundle's own prompt set
    if not prompts:
        raise ConfigError(f"the {fam.name} family needs --prompt (or --prompts-file / --embeddings)")
    if not any(k.startswith("text_encoder") for k in bundle.components):
        raise ConfigError(f"{bundle.name} has no text encoder; pass precomputed --embeddings FILE")
    import diffusers

    pipe = getattr(diffusers, bundle.pipeline_class)(transformer=tr, **bundle.components)
    with torch.no_grad():
        cond, uncond = fam.encode_prompts(pipe, prompts, device)
    return prompts, cond, uncond
