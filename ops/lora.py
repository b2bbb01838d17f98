"""LoRA for every family: lora_train(bundle, LoraConfig, data) -> (bundle with adapter, LoraReport).

Also apply_lora (load adapters into a bundle, each with its own scale), unload_lora (restore the exact base
modules) and fuse_lora (W + scale * alpha/rank * B A as new weights).

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

import copy
import dataclasses
import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from ditkit.formats.errors import ConfigError, FormatError, UnsupportedModelError, check_options, choice_error
from ditkit.formats.lora import Adapter, adapter_from_peft_state, match

from .training import MIXED_PRECISION, TrainConfig, train

ADAPTER_NAME = "ditkit"  # peft adapter name of the adapter being trained
TRIGGER_SLOT = "{trigger}"


# -- targets -----------------------------------------------------------------------------------------

def _attention_types() -> tuple[type, ...]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return (Attention, AttentionModuleMixin)


def _base(module: nn.Module) -> nn.Module:
    """The plain layer under a peft LoRA wrapper (or the module itself)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def linear_modules(tr: nn.Module) -> dict[str, tuple[int, int]]:
    """{name: (out_features, in_features)} of every Linear (LoRA-wrapped ones by their own name)."""
    out = {}
    for name, m in tr.named_modules():
        if ".base_layer" in name or re.search(r"\.lora_[AB]\.", name + "."):
            continue
        b = _base(m)
        if isinstance(b, nn.Linear) and not name.endswith((".lora_A", ".lora_B")):
            out[name] = (b.out_features, b.in_features)
    return out


def _linears_under(tr: nn.Module, types: tuple[type, ...]) -> list[str]:
    lin = linear_modules(tr)
    owners = [n for n, m in tr.named_modules() if isinstance(m, types)]
    return [n for n in lin if any(n.startswith(o + ".") for o in owners)]


def attention_targets(family, tr) -> list[str]:
    return _linears_under(tr, _attention_types())


def mlp_targets(family, tr) -> list[str]:
    from diffusers.models.attention import FeedForward

    names = set(_linears_under(tr, (FeedForward,)))
    blocks = [f"{n}.{i}" for n, c in tr.named_children() if isinstance(c, nn.ModuleList) for i in range(len(c))]
    for n in linear_modules(tr):  # Linears a block owns directly (Flux single-stream proj_mlp / proj_out)
        parent = n.rsplit(".", 1)[0]
        if parent in blocks and not family.is_modulation(n):
            names.add(n)
    return sorted(names, key=list(linear_modules(tr)).index)


def modulation_targets(family, tr) -> list[str]:
    return [n for n in linear_modules(tr) if family.is_modulation(n)]


@dataclass(frozen=True)
class Target:
    help: str
    modules: Callable  # (family, transformer) -> module names


TARGETS: dict[str, Target] = {
    "attention": Target("q/k/v/out projections of every attention (self, cross, joint)", attention_targets),
    "mlp": Target("feed-forward Linears of every block", mlp_targets),
    "modulation": Target("adaLN modulation Linears (the family's modulation layers)", modulation_targets),
}


def resolve_targets(family, tr, targets) -> list[str]:
    names: list[str] = []
    for t in targets:
        found = TARGETS[t].modules(family, tr)
        if not found:
            raise UnsupportedModelError(f"--targets {t}: this {family.name} transformer has no such layers; "
                                        f"choose among: {', '.join(TARGETS)}")
        names += [n for n in found if n not in names]
    return names


# -- config and report -------------------------------------------------------------------------------

@dataclass
class LoraConfig:
    rank: int = 4  # 4: a style/subject adapter; ~1-2% of the tiny defaults' transformers on attention alone
    alpha: float | None = None  # None: = rank, so the effective scale alpha/rank is 1 (always saved)
    targets: tuple[str, ...] = ("attention",)  # the usual LoRA recipe; add mlp / modulation for bigger shifts
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3  # LoRA factors start at B = 0 and are few: a higher LR than full fine-tuning
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    grad_checkpointing: bool = False
    ema_decay: float = 0.0  # off: short runs from B = 0, where an un-debiased EMA would lag the adapter
    checkpoint_every: int = 100
    validate_every: int = 0  # 0: validate once, at the end
    validation_images: int = 8
    validation_steps: int | None = None  # sampling steps of validation images; None: the model's default
    seed: int = 0
    trigger: str | None = None  # text families: added to every caption (or put where a caption says {trigger})
    caption_dropout: float = 0.1  # text families: share of steps' images trained on the empty prompt (CFG)
    prior_images: int = 0  # prior preservation: images the base generates itself (DreamBooth), 0 = off
    prior_weight: float = 1.0
    device: str = "cpu"

    def __post_init__(self):
        check_options(self)  # floats finite, seeds and counts in range (formats/errors.py)
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise ConfigError(f"--rank must be >= 1 (got {self.rank})")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"--alpha must be a positive number (got {self.alpha})")
        if not self.targets:
            raise ConfigError(f"--targets needs at least one of: {', '.join(TARGETS)}")
        for t in self.targets:
            if t not in TARGETS:
                raise choice_error("target", t, TARGETS)
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"--caption-dropout must be in [0, 1) (got {self.caption_dropout})")
        if self.prior_images < 0 or self.prior_weight < 0:
            raise ConfigError("--prior-images and --prior-weight must be >= 0")
        if self.validation_images < 1:
            raise ConfigError(f"--validation-images must be >= 1 (got {self.validation_images})")
        if self.trigger is not None and not self.trigger.strip():
            raise ConfigError("--trigger must be a non-empty word")
        if self.mixed_precision not in MIXED_PRECISION:
            raise choice_error("mixed precision", self.mixed_precision, MIXED_PRECISION)
        self.train_config()  # validates the shared training fields

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def train_config(self) -> TrainConfig:
        return TrainConfig.of(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


# fields that may change between a run and its --resume
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "validate_every", "validation_images", "validation_steps",
                     "device")


@dataclass
class LoraReport:
    family: str
    rank: int
    alpha: float
    scale: float
    targets: list
    modules: int
    adapter_params: int
    transformer_params: int
    adapter_fraction: float
    steps: int
    final_loss: float
    seconds: float
    resumed_from: int | None
    data: dict
    peak_memory_mb: dict
    base_unchanged: bool  # the base weights are bit-identical after training
    validation: dict = field(default_factory=dict)
    loss_first: float | None = None  # mean loss of the first 10% of this run's steps
    loss_last: float | None = None  # mean loss of the last 10%

    def to_dict(self) -> dict:
        return asdict(self)


# -- data: encode once ---------------------------------------------------------------------------------

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
    from .generate import latent_hw, vae_scale

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
        dist = vae.encode(x.to(device, vae.dtype)).latent_dist
        mean = dist.mean.float()
        if getattr(c, "shift_factor", None):
            mean = mean - c.shift_factor
        means.append((mean * c.scaling_factor).cpu())
        stds.append((dist.std.float() * c.scaling_factor).cpu())
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
        from .generate import GenerateConfig, generate

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


# -- adapters in a model -------------------------------------------------------------------------------

def _lora_layers(tr: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in tr.named_modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(tr: nn.Module) -> list[str]:
    names: list[str] = []
    for _, m in _lora_layers(tr):
        names += [k for k in m.lora_A.keys() if k not in names]
    return names


def _inject(tr: nn.Module, modules: list[str], rank: int, alpha: float, name: str) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    conf = PeftLoraConfig(r=rank, lora_alpha=alpha, target_modules=list(modules), lora_dropout=0.0, bias="none",
                          init_lora_weights=True)
    inject_adapter_in_model(conf, tr, adapter_name=name)


def base_digest(tr: nn.Module) -> str:
    """sha256 over the base weights (LoRA factors excluded; peft's base_layer names folded back)."""
    h = hashlib.sha256()
    sd = tr.state_dict()
    items = sorted((k.replace(".base_layer.", "."), v) for k, v in sd.items() if ".lora_" not in k)
    for k, v in items:
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def apply_lora(bundle, adapter: Adapter | list[Adapter], scale: float | list[float] = 1.0):
    """Load adapter(s) into the bundle's transformer (in place), each active with its own scale; returns the
    bundle. An adapter for another family, or with keys that match no module, raises FormatError."""
    from peft import set_peft_model_state_dict

    adapters = adapter if isinstance(adapter, list) else [adapter]
    scales = scale if isinstance(scale, list) else [scale] * len(adapters)
    if len(scales) != len(adapters):
        raise ConfigError(f"{len(scales)} --lora-scale values for {len(adapters)} adapters; give one, or one each")
    tr, fam = bundle.transformer, bundle.family
    for i, ad in enumerate(adapters):
        if ad.family is not None and ad.family != fam.name:
            raise FormatError(f"adapter {ad.path or i} was trained for the {ad.family} family; this model is "
                              f"{fam.name}")
    modules = linear_modules(tr)
    adapters = [match(ad, modules) for ad in adapters]  # every adapter matches before any is applied
    names = adapter_names(tr)
    for i, (ad, s) in enumerate(zip(adapters, scales)):
        name = f"lora{len(names)}"
        _inject(tr, ad.modules, ad.rank, ad.alpha, name)
        p = next(tr.parameters())
        state = {k: v.to(p.device) for k, v in ad.peft_state_dict().items()}
        res = set_peft_model_state_dict(tr, state, adapter_name=name)
        bad = [k for k in res.unexpected_keys if ".lora_" in k]
        missing = [k for k in res.missing_keys if f".{name}." in k]
        if bad or missing:
            raise FormatError(f"adapter {ad.path or i} did not load: {(bad or missing)[:5]}")
        for _, layer in _lora_layers(tr):
            if name in layer.lora_A:
                layer.set_scale(name, float(s))
        names.append(name)
    for _, layer in _lora_layers(tr):
        layer.set_adapter(names, inference_mode=True)
    tr.requires_grad_(False)
    return bundle


def unload_lora(bundle):
    """Remove every adapter: the wrapped Linears are put back as they were (same tensors); returns the bundle."""
    tr = bundle.transformer
    for name, layer in sorted(_lora_layers(tr), key=lambda x: -len(x[0])):
        parent = tr.get_submodule(name.rsplit(".", 1)[0]) if "." in name else tr
        setattr(parent, name.rsplit(".", 1)[-1], layer.get_base_layer())
    return bundle


def fuse_lora(bundle, adapter: Adapter | list[Adapter], scale: float | list[float] = 1.0):
    """A new bundle whose transformer holds W + scale * (alpha / rank) * B A (the input is left untouched)."""
    adapters = adapter if isinstance(adapter, list) else [adapter]
    scales = scale if isinstance(scale, list) else [scale] * len(adapters)
    if len(scales) != len(adapters):
        raise ConfigError(f"{len(scales)} --lora-scale values for {len(adapters)} adapters; give one, or one each")
    tr = copy.deepcopy(bundle.transformer)
    unload_lora(dataclasses.replace(bundle, transformer=tr))
    mods = linear_modules(tr)
    for ad, s in zip(adapters, scales):
        if ad.family is not None and ad.family != bundle.family.name:
            raise FormatError(f"adapter {ad.path} was trained for the {ad.family} family; this model is "
                              f"{bundle.family.name}")
        ad = match(ad, mods)
        with torch.no_grad():
            for m in ad.modules:
                lin = tr.get_submodule(m)
                delta = (ad.B[m].double() @ ad.A[m].double()) * (float(s) * ad.scale)
                lin.weight.copy_((lin.weight.double() + delta.to(lin.weight.device)).to(lin.weight.dtype))
    return dataclasses.replace(bundle, transformer=tr)


def extract_adapter(bundle, cfg: LoraConfig, info: dict | None = None) -> Adapter:
    """The trained adapter (peft's state dict of ADAPTER_NAME) with its config, family and base digest."""
    from peft import get_peft_model_state_dict

    tr = bundle.transformer
    if ADAPTER_NAME not in adapter_names(tr):
        raise ConfigError("this bundle carries no adapter trained by lora_train")
    state = get_peft_model_state_dict(tr, adapter_name=ADAPTER_NAME)
    return adapter_from_peft_state({k: v.float() for k, v in state.items()}, cfg.rank, cfg.alpha,
                                   family=bundle.family.name, targets=list(cfg.targets),
                                   base_sha256=bundle.parent_record().get("sha256"), info=dict(info or {}))


# -- training ---------------------------------------------------------------------------------------------

class _Call:
    """Calls go through the (possibly DDP-wrapped) training model; attributes come from the transformer."""

    def __init__(self, wrapped, inner):
        self._wrapped, self._inner = wrapped, inner

    def __call__(self, *a, **k):
        return self._wrapped(*a, **k)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _noise_schedule(bundle):
    import diffusers

    from .sample import DEFAULT_SCHEDULER

    fam = bundle.family
    if fam.prediction == "flow":
        return None, "flow"
    if bundle.scheduler is not None:
        conf = dict(bundle.scheduler.config)
    else:
        conf = DEFAULT_SCHEDULER["epsilon"][1]
    ddpm = diffusers.DDPMScheduler.from_config(conf)
    return ddpm.alphas_cumprod.float(), conf.get("prediction_type", "epsilon")


def _rows(tensors: dict, prefix: str, idx: torch.Tensor) -> dict:
    return {k[len(prefix):]: v[idx] for k, v in tensors.items() if k.startswith(prefix)}


def make_loss(bundle, tensors: dict, cfg: LoraConfig) -> Callable:
    """loss_fn(model, generator, rank, world) for ops.training.train: the denoising loss of the family."""
    fam, tr = bundle.family, bundle.transformer
    acp, kind = _noise_schedule(bundle)
    micro = cfg.batch_size // cfg.grad_accum
    guidance = float(bundle.defaults()["guidance"])
    p_dtype = next(tr.parameters()).dtype

    def one(model, g, rank, world, prefix):
        mean, std = tensors[prefix + "latent_mean"], tensors[prefix + "latent_std"]
        n = mean.shape[0]
        # 1. draw the global micro-batch (identical on every process), then take this process's slice
        idx = torch.randint(0, n, (micro,), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)  # (B, C, h, w)
        noise = torch.randn(z.shape, generator=g)
        if kind == "flow":
            sigma = torch.sigmoid(torch.randn(micro, generator=g))  # logit-normal (SD3's training density)
        else:
            t_int = torch.randint(0, len(acp), (micro,), generator=g)
        drop = torch.rand(micro, generator=g) < cfg.caption_dropout
        mine = slice(rank, None, world)
        idx, z, noise, drop = idx[mine], z[mine], noise[mine], drop[mine]
        # 2. condition rows (text: the empty prompt for the dropped ones; class: the model drops labels itself)
        if fam.conditioning == "class":
            cond = {"class_labels": tensors[prefix + "labels"][idx]}
        else:
            cond = _rows(tensors, prefix + "cond.", idx)
            unc = {k[len(prefix + "uncond."):]: v for k, v in tensors.items() if k.startswith(prefix + "uncond.")}
            fits = bool(unc) and all(k in unc and unc[k].shape[1:] == v.shape[1:] for k, v in cond.items())
            if fits and drop.any():
                cond = {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), unc[k].expand_as(v), v)
                        for k, v in cond.items()}
        # 3. noise the latents and predict
        if kind == "flow":
            s = sigma[mine].view(-1, 1, 1, 1)
            x = (1 - s) * z + s * noise
            t = sigma[mine] * 1000.0
            target = noise - z
        else:
            t = t_int[mine]
            a = acp[t].view(-1, 1, 1, 1)
            x = a.sqrt() * z + (1 - a).sqrt() * noise
            target = a.sqrt() * noise - (1 - a).sqrt() * z if kind == "v_prediction" else noise
        p = next(tr.parameters())
        cond = {k: (v.to(p.device, p_dtype) if v.is_floating_point() else v.to(p.device)) for k, v in cond.items()}
        pred = fam.predict(_Call(model, tr), x.to(p.device, p_dtype), t.to(p.device), cond, guidance)
        return torch.nn.functional.mse_loss(pred.float(), target.to(p.device))

    def loss_fn(model, g, rank, world):
        loss = one(model, g, rank, world, "")
        if "prior.latent_mean" in tensors and cfg.prior_weight > 0:
            loss = loss + cfg.prior_weight * one(model, g, rank, world, "prior.")
        return loss

    return loss_fn


def estimate_peak_memory(bundle, tensors: dict, cfg: LoraConfig, world: int = 1) -> dict:
    """Bytes: loaded weights + optimizer state (grads, AdamW m and v, EMA, of the LoRA factors) + activations, the last
    measured on one sample's forward pass (bytes of the tensors autograd saves for backward) and scaled to the
    per-process micro-batch (twice with prior preservation). With --grad-checkpointing: what the checkpointed
    forward saves (block inputs) plus one block's share of the full figure (the block recomputed in backward)."""
    from .memory import module_bytes

    tr = bundle.transformer
    weights = module_bytes(bundle)  # every loaded component (transformer with its LoRA factors, VAE, encoders)
    trainable = sum(p.numel() * p.element_size() for p in tr.parameters() if p.requires_grad)
    optim = trainable * (3 + (1 if cfg.ema_decay > 0 else 0))  # grads + Adam m, v (+ EMA)
    probe = make_loss(bundle, tensors, dataclasses.replace(cfg, batch_size=1, grad_accum=1, prior_weight=0.0))

    def saved_bytes() -> int:
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            probe(tr, torch.Generator().manual_seed(0), 0, 1)
        return saved[0]

    per_sample = saved_bytes()
    if cfg.grad_checkpointing and getattr(tr, "_supports_gradient_checkpointing", False) \
            and not tr.is_gradient_checkpointing:
        blocks = sum(len(c) for c in tr.children() if isinstance(c, nn.ModuleList)) or 1
        tr.enable_gradient_checkpointing()
        try:
            per_sample = saved_bytes() + per_sample // blocks
        finally:
            tr.disable_gradient_checkpointing()  # training turns it on again (ops/training.py)
    per_process = max(1, cfg.batch_size // cfg.grad_accum // world)
    prior = 2 if "prior.latent_mean" in tensors and cfg.prior_weight > 0 else 1
    acts = per_sample * per_process * prior
    return {"weights": int(weights), "optimizer": int(optim), "activations": int(acts),
            "total": int(weights + optim + acts), "micro_batch": per_process}


def _in_mb(mem: dict) -> dict:
    """The report's figures: bytes -> MiB, one decimal (micro_batch unchanged)."""
    return {k: (v if k == "micro_batch" else round(v / 2**20, 1)) for k, v in mem.items()}


def lora_train(bundle, cfg: LoraConfig, data, store=None, resume: bool = False, *, embeddings=None,
               log: Callable[[str], None] | None = None, on_step: Callable[[int, float], None] | None = None,
               on_validation: Callable | None = None, data_info: dict | None = None,
               on_plan: Callable[[dict], None] | None = None):
    """Train a LoRA adapter on `data` (an ImageFolder, or the tensors of encode_data); returns the bundle,
    whose transformer now carries the adapter (peft name ADAPTER_NAME, active), and the report.
    on_plan(plan) runs once the plan is printed, before the optimizer and step 1: plan["memory"] is
    estimate_peak_memory's bytes (the CLI refuses a job that cannot fit there); raising stops the run with the
    base unchanged but the adapter still injected (the CLI exits)."""
    say = log or (lambda msg: None)
    fam, tr = bundle.family, bundle.transformer
    if adapter_names(tr):
        raise ConfigError("the model already carries LoRA adapters; fuse them first (lora-train --fuse-into) "
                          "or train on the plain base")
    from ditkit.formats import quantized

    if quantized.is_quantized(tr):
        raise UnsupportedModelError("lora-train needs a full-precision base; train on the model before quantizing")
    if isinstance(data, dict):
        tensors, info = data, dict(data_info or {})
    else:
        tensors, info = encode_data(bundle, data, cfg, embeddings)
    tensors = {k: v.cpu() for k, v in tensors.items()}

    # 1. inject the adapter (seeded init: lora_A kaiming-uniform, lora_B zeros)
    before = base_digest(tr)
    modules = resolve_targets(fam, tr, cfg.targets)
    torch.manual_seed(cfg.seed)
    _inject(tr, modules, cfg.rank, cfg.alpha, ADAPTER_NAME)
    for _, layer in _lora_layers(tr):
        layer.set_adapter([ADAPTER_NAME])  # trainable
    lora_params = sum(p.numel() for n, p in tr.named_parameters() if ".lora_" in n)
    base_params = sum(p.numel() for n, p in tr.named_parameters() if ".lora_" not in n)
    if any(p.requires_grad for n, p in tr.named_parameters() if ".lora_" not in n):
        raise RuntimeError("base weights would train: only LoRA factors may require grad")

    # 2. the loss, the memory plan, validation
    loss_fn = make_loss(bundle, tensors, cfg)
    from . import distributed

    _, world = distributed.world()
    mem = estimate_peak_memory(bundle, tensors, cfg, world)
    say(f"lora-train {fam.name}: rank {cfg.rank}, alpha {cfg.alpha:g} (effective scale alpha/rank = "
        f"{cfg.scale:g}), targets {', '.join(cfg.targets)} -> {len(modules)} Linear layers")
    say(f"  trains {lora_params:,} LoRA parameters ({100 * lora_params / base_params:.2f}% of the transformer's "
        f"{base_params:,}); base weights frozen")
    say(f"  data: {info.get('images', tensors['latent_mean'].shape[0])} images from {info.get('source', 'memory')}"
        f" ({info.get('layout', 'encoded')}), latents {tuple(tensors['latent_mean'].shape[1:])}"
        + (f", {info.get('prior_images')} prior-preservation images" if info.get("prior_images") else ""))
    say(f"  {cfg.steps} steps x batch {cfg.batch_size} (micro-batch {mem['micro_batch']} per process, "
        f"{world} process{'es' if world > 1 else ''}), lr {cfg.lr:g}, mixed precision {cfg.mixed_precision}")
    from .memory import describe

    say(f"  estimated peak memory: {describe(mem['total'])} (weights {describe(mem['weights'])}, grads+optimizer "
        f"{describe(mem['optimizer'])}, activations {describe(mem['activations'])})")
    if on_plan is not None:
        on_plan({"family": fam.name, "modules": len(modules), "adapter_params": lora_params,
                 "transformer_params": base_params, "memory": mem})

    val_cond = _validation_conditions(tensors, info, fam, cfg)

    def validate(step: int) -> dict:
        from .generate import GenerateConfig, generate

        kind = "labels" if fam.conditioning == "class" else "prompts"
        gcfg = GenerateConfig(**{kind: val_cond}, num_images=cfg.validation_images, seed=cfg.seed,
                              steps=cfg.validation_steps, device=cfg.device)
        images, rep = generate(bundle, gcfg, embeddings)
        metrics = {"images": rep.num_images}
        if rep.judge:
            metrics.update({f"judge_{k}": v for k, v in rep.judge.items() if k != "n"})
        if on_validation is not None and images is not None:
            on_validation(step, images, rep.conditions, metrics)
        return metrics

    # 3. train (exact resume: the store keeps LoRA factors, optimizer, scheduler, RNG)
    record = {"lora": cfg.to_dict(), "modules": modules}
    if resume and store is not None and store.exists():
        _check_resume(store, record)
    result = train(tr, loss_fn, cfg.train_config(), store=store, resume=resume, validate=validate,
                   on_step=on_step, config_record=record)
    tr.requires_grad_(False)
    after = base_digest(tr)
    losses = [r["loss"] for r in result.log]
    k = max(1, len(losses) // 10)
    report = LoraReport(
        family=fam.name, rank=cfg.rank, alpha=cfg.alpha, scale=cfg.scale, targets=list(cfg.targets),
        modules=len(modules), adapter_params=lora_params, transformer_params=base_params,
        adapter_fraction=round(lora_params / base_params, 5), steps=result.step, final_loss=result.final_loss,
        seconds=result.seconds, resumed_from=result.resumed_from, data=info, peak_memory_mb=_in_mb(mem),
        base_unchanged=before == after, validation=result.validation,
        loss_first=float(np.mean(losses[:k])) if losses else None,
        loss_last=float(np.mean(losses[-k:])) if losses else None)
    return bundle, report


def _validation_conditions(tensors, info, fam, cfg) -> list:
    if fam.conditioning == "class":
        labels = tensors["labels"].tolist()
        return sorted(set(labels), key=labels.index)
    caps = info.get("captions_used") or []
    if not caps:
        raise ConfigError("validation needs the training captions; re-encode the data")
    return caps[:cfg.validation_images]


def _check_resume(store, record: dict) -> None:
    state = store.load()
    old = state.get("config", {})
    old_l, new_l = old.get("lora", {}), record["lora"]
    diff = sorted(k for k in set(old_l) | set(new_l) if k not in RESUMABLE_CHANGES and old_l.get(k) != new_l.get(k))
    if diff:
        raise ConfigError(f"--resume: the checkpoint in {store.root} was made with different settings "
                          f"({', '.join(f'{k}: {old_l.get(k)!r} -> {new_l.get(k)!r}' for k in diff[:4])}); "
                          "use the same options, or start without --resume")
    if old.get("modules") != record["modules"]:
        raise ConfigError(f"--resume: the checkpoint in {store.root} adapts other modules; start without --resume")
