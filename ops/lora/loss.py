"""The denoising loss lora-train minimizes, and the peak memory a run will need."""
from __future__ import annotations

import contextlib

import dataclasses
from typing import Callable

import torch
from torch import nn

from .config import LoraConfig


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

    from ..sample import DEFAULT_SCHEDULER

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


class _LabelDropout:
    """Class-label dropout drawn from the batch generator (the same on every process, so N processes train what one
    does at the same global batch), at the rate of the model's own diffusers LabelEmbedding(s) (DiT: 0.1). Their
    own dropout, which draws from each process's global RNG (and in DiT once per block), is switched off around the
    forward and put back after."""

    def __init__(self, tr: torch.nn.Module):
        from diffusers.models.embeddings import LabelEmbedding

        self.embedders = [m for m in tr.modules() if isinstance(m, LabelEmbedding)]
        self.rate = max((float(m.dropout_prob) for m in self.embedders), default=0.0)

    def draw(self, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.rate <= 0:
            return labels
        dropped = torch.rand(labels.shape[0], generator=g) < self.rate
        return torch.where(dropped, self.embedders[0].num_classes, labels)

    @staticmethod
    @contextlib.contextmanager
    def off(model: torch.nn.Module):
        """`model`: what trains (under fsdp a sharded copy, with its own embedders)."""
        from diffusers.models.embeddings import LabelEmbedding

        embedders = [m for m in model.modules() if isinstance(m, LabelEmbedding)]
        saved = [m.dropout_prob for m in embedders]
        try:
            for m in embedders:
                m.dropout_prob = 0.0
            yield
        finally:
            for m, rate in zip(embedders, saved):
                m.dropout_prob = rate


def make_loss(bundle, tensors: dict, cfg: LoraConfig) -> Callable:
    """loss_fn(model, generator, rank, world) for ops.training.train: the denoising loss of the family."""
    fam, tr = bundle.family, bundle.transformer
    acp, kind = _noise_schedule(bundle)
    micro = cfg.batch_size // cfg.grad_accum
    guidance = float(bundle.defaults()["guidance"])
    p_dtype = next(tr.parameters()).dtype
    label_drop = _LabelDropout(tr)

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
        labels = label_drop.draw(tensors[prefix + "labels"][idx], g) if fam.conditioning == "class" else None
        idx, z, noise, drop = idx[mine], z[mine], noise[mine], drop[mine]
        # 2. condition rows (text: the empty prompt for the dropped ones; class: the null label, drawn above)
        if fam.conditioning == "class":
            cond = {"class_labels": labels[mine]}
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
        with label_drop.off(model):
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
    from ..memory import module_bytes

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
