"""lora_train: inject the adapter, plan, train with the shared loop (ops/training.py), report."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ditkit.formats.errors import ConfigError

from ..training import train
from .adapters import ADAPTER_NAME, _inject, _lora_layers, adapter_names, base_digest
from .config import RESUMABLE_CHANGES, LoraConfig, LoraReport
from .data import encode_data
from .loss import _in_mb, estimate_peak_memory, make_loss
from .targets import resolve_targets


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
    # a quantized base trains as QLoRA: frozen quantized weights, float adapter, gradients through the quantized
    # forward (each quantized kind is differentiable w.r.t. its input: nn/quantized/base.input_differentiable)
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
    from .. import distributed

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
    from ..memory import describe

    say(f"  estimated peak memory: {describe(mem['total'])} (weights {describe(mem['weights'])}, grads+optimizer "
        f"{describe(mem['optimizer'])}, activations {describe(mem['activations'])})")
    if on_plan is not None:
        on_plan({"family": fam.name, "modules": len(modules), "adapter_params": lora_params,
                 "transformer_params": base_params, "memory": mem})

    val_cond = _validation_conditions(tensors, info, fam, cfg)

    def validate(step: int) -> dict:
        from ..generate import GenerateConfig, generate

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
        _check_resume(store, record, cfg)
    result = train(tr, loss_fn, cfg.train_config(), store=store, resume=resume, validate=validate,
                   on_step=on_step, config_record=record, shard_units=fam.shard_units)
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
        loss_last=float(np.mean(losses[-k:])) if losses else None, sharding=result.sharding)
    return bundle, report


def _validation_conditions(tensors, info, fam, cfg) -> list:
    if fam.conditioning == "class":
        labels = tensors["labels"].tolist()
        return sorted(set(labels), key=labels.index)
    caps = info.get("captions_used") or []
    if not caps:
        raise ConfigError("validation needs the training captions; re-encode the data")
    return caps[:cfg.validation_images]


def _check_resume(store, record: dict, cfg: LoraConfig) -> None:
    from ditkit.ops.config import same_run

    state = store.load()
    old = state.get("config", {})
    old_l, new_l = old.get("lora", {}), record["lora"]
    diff = same_run(old_l, cfg, RESUMABLE_CHANGES)  # compared as configs (LoraConfig.from_dict of the stored one)
    if diff:
        raise ConfigError(f"--resume: the checkpoint in {store.root} was made with different settings "
                          f"({', '.join(f'{k}: {old_l.get(k)!r} -> {new_l.get(k)!r}' for k in diff[:4])}); "
                          "use the same options, or start without --resume")
    if old.get("modules") != record["modules"]:
        raise ConfigError(f"--resume: the checkpoint in {store.root} adapts other modules; start without --resume")
