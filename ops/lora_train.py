"""lora_train_job / lora_adapt_job: one `ditkit lora-train` run around ops.lora.

lora_train_job trains an adapter on an image folder: the data encoded once (latents and embeddings, cached in
the checkpoint directory by what they depend on), the plan's memory checked before step 1, exact resume, seeded
validation grids; it returns the adapter (and, when asked, the base with it fused) for the caller to write.
lora_adapt_job takes existing adapters instead: a kohya file's flat names resolved against the model for a
re-export, and/or the adapters fused into the weights. No printing: talk goes to `log`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ditkit.formats.checkpoint import CheckpointStore
from ditkit.formats.errors import ConfigError, HardwareError, UnsupportedModelError
from ditkit.formats.quantized import is_quantized

from .lora import (TARGETS, LoraConfig, adapter_scales, cache_key, encode_data, extract_adapter, fuse_lora,
                   linear_modules, lora_train, native_size)

REPORTED = ("steps", "final_loss", "adapter_fraction", "base_unchanged", "validation")  # kept in the adapter file


@dataclass
class LoraJob:
    """What a lora-train run made, for the caller to write."""
    adapter: object = None  # formats.lora.Adapter to save (trained, or re-exported)
    fused: object = None  # the base bundle with the adapters fused in (None: not asked)
    adapters: list = field(default_factory=list)  # the adapters fused (for the fused bundle's manifest)
    scales: list = field(default_factory=list)
    modules: dict | None = None  # the base's Linear layers {name: (out, in)}: what --format original lays out


def checkpoint_dir(out: Path, given: Path | None) -> Path:
    """Resumable state lives beside the adapter (OUT.ckpt/), never inside the atomic output."""
    return Path(given) if given is not None else Path(out).with_suffix(".ckpt")


def _data(bundle, folder, cfg: LoraConfig, store: CheckpointStore, emb, rank0: bool, log) -> tuple[dict, dict]:
    """The encoded data: from the checkpoint directory's cache when it was made from the same inputs."""
    from ditkit.formats.datasets import CACHE, load_cache, save_cache
    ckpt = store.root

    key = cache_key(bundle, folder, cfg)
    cached = load_cache(ckpt / CACHE, key)
    if cached is not None:
        log(f"data: latents and embeddings from the cache {ckpt / CACHE}")
        return cached
    tensors, info = encode_data(bundle, folder, cfg, emb)
    if rank0:
        store.mark()  # the directory is ditkit's (its marker) from its first file on
        save_cache(ckpt / CACHE, tensors, key, info)
    return tensors, info


def lora_train_job(bundle, cfg: LoraConfig, *, data: Path, ckpt: Path, resume: bool = False, force: bool = False,
                   embeddings: Path | None = None, fuse: bool = False, log: Callable[[str], None] = lambda m: None,
                   on_step: Callable[[int, float], None] | None = None) -> tuple[LoraJob, object]:
    """Train an adapter on the image folder `data` ((LoraJob, report); LoraJob.fused with `fuse`).
    on_step(step, loss) after every step. The plan's memory is checked before the optimizer exists
    (HardwareError unless `force`; a data cache this run wrote is removed again)."""
    from ditkit.formats.datasets import CACHE, read_image_folder, save_validation
    from ditkit.formats.embeddings import load_embeddings
    from ditkit.ops import distributed, memory

    rank0 = distributed.world()[0] == 0
    if fuse and is_quantized(bundle.transformer):  # refused before any training: fuse_lora would refuse after it
        raise UnsupportedModelError(f"--fuse-into: {bundle.name} is quantized (the adapter trains against its "
                                    "quantized weights, QLoRA); drop --fuse-into and use the adapter with generate "
                                    "--lora, or fuse it into the float model and quantize that: ditkit quantize FLOAT "
                                    "--lora ADAPTER")
    emb = load_embeddings(embeddings) if embeddings else None
    folder = read_image_folder(data, size=native_size(bundle))
    made = ckpt if rank0 and not ckpt.exists() else None  # removed again if the memory check refuses the job
    store = CheckpointStore(ckpt)
    if force and not resume and store.has_run():
        store.start_over(keep=(CACHE,))  # the keyed data cache stays; the rest goes at the first write
    tensors, info = _data(bundle, folder, cfg, store, emb, rank0, log)
    modules = linear_modules(bundle.transformer)  # before the adapter wraps them

    def on_plan(plan: dict) -> None:  # before the optimizer and step 1
        mem = plan["memory"]
        est = memory.Estimate("lora-train", {k: mem[k] for k in ("weights", "optimizer", "activations")},
                              allocated=mem["weights"],
                              hint="use a smaller --batch-size, more --grad-accum or --grad-checkpointing")
        try:
            memory.check(est, cfg.device, force, log)
        except HardwareError:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)  # the data cache this run wrote: nothing left behind
            raise

    bundle, report = lora_train(
        bundle, cfg, tensors, store, resume, embeddings=emb, data_info=info, log=log,
        on_plan=on_plan, on_step=on_step,
        on_validation=lambda step, images, conds, metrics: rank0 and save_validation(ckpt, step, images, conds,
                                                                                      metrics))
    adapter = extract_adapter(bundle, cfg, info={
        "trigger": cfg.trigger, "lora_config": cfg.to_dict(),
        "report": {k: v for k, v in report.to_dict().items() if k in REPORTED},
        "data": {k: v for k, v in info.items() if k != "captions_used"}})
    job = LoraJob(adapter=adapter, adapters=[adapter], scales=[1.0], modules=modules)
    if fuse and rank0:
        job.fused = fuse_lora(bundle, [adapter], [1.0])
    return job, report


@dataclass
class AdaptReport:
    adapters: list  # each adapter's summary
    scales: list[float]

    def to_dict(self) -> dict:
        return {"adapters": self.adapters, "scales": self.scales}


def lora_adapt_job(bundle, adapters: list, scales: list[float], *, reexport: bool,
                   fuse: bool) -> tuple[LoraJob, AdaptReport]:
    """Existing adapters: the first for a re-export (a kohya file's flat names matched to the model's layers, so
    `bundle` is needed then), and/or all of them fused at `scales` (one, or one per adapter)."""
    from ditkit.formats.lora import match

    scales = adapter_scales(scales, len(adapters))
    job = LoraJob(adapters=adapters, scales=scales)
    if reexport:
        job.adapter = adapters[0]
        if bundle is not None:  # kohya's flat and the authors' names resolved to the model's modules
            job.modules = linear_modules(bundle.transformer)
            job.adapter = match(job.adapter, job.modules)
    if fuse:
        job.fused = fuse_lora(bundle, adapters, scales)
    return job, AdaptReport([a.summary() for a in adapters], scales)


def needs_model(adapters: list, reexport: bool, fuse: bool, fmt: str = "peft") -> bool:
    """Whether lora_adapt_job needs the base loaded (fusing; re-exporting a kohya file, or into the authors'
    layout, which needs the model's modules)."""
    return fuse or (reexport and (fmt == "original" or adapters[0].info.get("source_format") == "kohya"))


def check_train(out: Path | None, lora_scale) -> None:
    if out is None or Path(out).suffix != ".safetensors":
        raise ConfigError("lora-train needs -o ADAPTER.safetensors")
    if lora_scale:
        raise ConfigError("--lora-scale goes with --lora; a trained adapter is fused at scale 1")


__all__ = ["TARGETS", "LoraConfig", "LoraJob", "AdaptReport", "checkpoint_dir", "lora_train_job", "lora_adapt_job",
           "needs_model"]
