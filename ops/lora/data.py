"""Training data, encoded once: latents (VAE posterior mean/std), labels or text embeddings, prior images."""
from __future__ import annotations

import hashlib
import re

import numpy as np
import torch

from ditkit.formats.errors import ConfigError, UnsupportedModelError

from .config import LoraConfig


TRIGGER_SLOT = "{trigger}"


def add_trigger(caption: str, trigger: str | None) -> str:
    if trigger is None:
        return caption
    if TRIGGER_SLOT in caption:
        return caption.replace(TRIGGER_SLOT, trigger)
    if re.search(rf"(^|\W){re.escape(trigger)}(\W|$)", caption):
        return caption
    return f"{trigger} {caption}".strip()


def strip_trigger(caption: str, trigger: str | None) -> str:
    """The class prompt of a caption: the caption without its trigger word (for prior preservation)."""
    if trigger is None:
        return caption
    text = caption.replace(TRIGGER_SLOT, "")
    text = re.sub(rf"(^|\s){re.escape(trigger)}(?=\s|$)", " ", text)
    return " ".join(text.split())


def native_size(bundle) -> tuple[int, int]:
    from ..geometry import latent_hw, vae_scale

    h, w = latent_hw(bundle, None, None)
    s = vae_scale(bundle)
    return h * s, w * s


@torch.no_grad()
def encode_images(vae, images: np.ndarray, device, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, H, W, 3) -> scaled latent posterior (mean, std), each (N, C, h, w) float32 on CPU."""
    c = vae.config
    means, stds = [], []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
        enc = vae.encode(x.to(device, vae.dtype))
        dist = getattr(enc, "latent_dist", None)  # DC-AE (AutoencoderDC) encodes deterministically: std 0
        mean = (dist.mean if dist is not None else enc.latent).float()
        std = dist.std.float() if dist is not None else torch.zeros_like(mean)
        if getattr(c, "shift_factor", None):
            mean = mean - c.shift_factor
        means.append((mean * c.scaling_factor).cpu())
        stds.append((std * c.scaling_factor).cpu())
    return torch.cat(means), torch.cat(stds)


def _text_rows(bundle, prompts: list[str], device, embeddings=None) -> tuple[dict, dict | None]:
    """Embeddings for `prompts` (one row each) and the empty prompt's (one row), from the bundle's text
    encoder through the family's encode_prompts, or from a precomputed embeddings file."""
    if embeddings is not None:
        names, cond, uncond = embeddings
        missing = [p for p in prompts if p not in names]
        if missing:
            raise ConfigError(f"caption {missing[0]!r} is not in the --embeddings file ({len(missing)} missing); "
                              "it must hold every caption (after --trigger)")
        rows = [names.index(p) for p in prompts]
        return ({k: v[rows] for k, v in cond.items()},
                None if uncond is None else {k: v[:1] for k, v in uncond.items()})
    if not any(k.startswith("text_encoder") for k in bundle.components):
        raise ConfigError(f"{bundle.name} has no text encoder; pass --embeddings FILE with every caption's embeddings")
    import diffusers

    pipe = getattr(diffusers, bundle.pipeline_class)(transformer=bundle.transformer, **bundle.components)
    with torch.no_grad():
        cond, uncond = bundle.family.encode_prompts(pipe, list(prompts), device)
    cond = {k: v.detach().cpu() for k, v in cond.items()}
    uncond = None if uncond is None else {k: v[:1].detach().cpu() for k, v in uncond.items()}
    return cond, uncond


def _conditions(bundle, captions, labels, cfg, device, embeddings, prefix) -> dict:
    fam = bundle.family
    out = {}
    if fam.conditioning == "class":
        out[f"{prefix}labels"] = torch.tensor(labels, dtype=torch.long)
        return out
    unique = sorted(set(captions))
    cond, uncond = _text_rows(bundle, unique, device, embeddings)
    idx = torch.tensor([unique.index(c) for c in captions])
    out.update({f"{prefix}cond.{k}": v[idx] for k, v in cond.items()})
    if uncond is not None:
        out.update({f"{prefix}uncond.{k}": v for k, v in uncond.items()})
    return out


def encode_data(bundle, folder, cfg: LoraConfig, embeddings=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything training reads, computed once: (tensors, info).

    tensors: latent_mean/latent_std (N, C, h, w), labels (class families) or cond.<name> / uncond.<name>
    (text families), and prior.* twins when prior preservation is on (images the base generates itself).
    """
    fam = bundle.family
    if bundle.vae is None:
        raise UnsupportedModelError(f"{bundle.name} has no VAE to encode training images; give a pipeline "
                                    "directory (model_index.json with a vae)")
    if fam.conditioning == "class":
        if folder.labels is None:
            raise ConfigError(f"the {fam.name} family is class-conditional: --data needs class labels "
                              "(class folders 0/, 1/ ... or a \"label\" per line of metadata.jsonl)")
        if cfg.trigger is not None:
            raise ConfigError(f"--trigger is for text families; {fam.name} is class-conditional (labels train as is)")
        n_classes = bundle.transformer.config.num_embeds_ada_norm
        bad = sorted({l for l in folder.labels if l >= n_classes})
        if bad:
            raise ConfigError(f"--data labels {bad} out of range: this model has classes 0..{n_classes - 1}")
        captions = None
    else:
        if folder.captions is None:
            raise ConfigError(f"the {fam.name} family is text-conditioned: --data needs a caption per image "
                              "(name.txt beside name.png, or \"text\" in metadata.jsonl)")
        captions = [add_trigger(c, cfg.trigger) for c in folder.captions]
    size = native_size(bundle)
    if tuple(folder.images.shape[1:3]) != size:
        raise ConfigError(f"--data images are {folder.images.shape[1]}x{folder.images.shape[2]}; "
                          f"this model trains at {size[0]}x{size[1]}")
    device = cfg.device
    tensors = {}
    mean, std = encode_images(bundle.vae, folder.images, device)
    tensors.update(latent_mean=mean, latent_std=std)
    tensors.update(_conditions(bundle, captions, folder.labels, cfg, device, embeddings, ""))
    info = {**folder.describe(), "captions_used": sorted(set(captions))[:20] if captions else None,
            "prior_images": 0}
    if cfg.prior_images:
        from ..generate import GenerateConfig, generate

        n = len(folder.files)
        rows = [i % n for i in range(cfg.prior_images)]
        if fam.conditioning == "class":
            gen = GenerateConfig(labels=[folder.labels[i] for i in rows], seed=cfg.seed + 1, device=device)
            p_caps, p_labels = None, [folder.labels[i] for i in rows]
        else:
            p_caps = [strip_trigger(captions[i], cfg.trigger) for i in rows]
            gen = GenerateConfig(prompts=p_caps, seed=cfg.seed + 1, device=device)
            p_labels = None
        images, _ = generate(bundle, gen, embeddings)
        pm, ps = encode_images(bundle.vae, images, device)
        tensors.update({"prior.latent_mean": pm, "prior.latent_std": ps})
        tensors.update(_conditions(bundle, p_caps, p_labels, cfg, device, embeddings, "prior."))
        info["prior_images"] = len(images)
        info["prior_prompts"] = sorted(set(p_caps))[:20] if p_caps else None
    return tensors, info


def cache_key(bundle, folder, cfg: LoraConfig) -> str:
    """What the encoded data depends on: the images, captions, labels, base weights and encoding settings."""
    h = hashlib.sha256()
    parts = [folder.digest, bundle.parent_record().get("sha256"), cfg.trigger, cfg.prior_images, cfg.seed]
    h.update(repr(parts).encode())
    return h.hexdigest()
