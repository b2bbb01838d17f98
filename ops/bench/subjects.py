"""A model under bench and the exact calls bench times for it: one sampler step, one end-to-end image batch."""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch import nn

from ditkit.formats.errors import ConfigError

from ..accelerators import step_predictor
from ..generate import GenerateConfig
from ..geometry import conditions, latent_hw, settings
from ..sample import decode, denoise, image_noise, make_scheduler
from .report import BenchConfig


class _Subject:
    """A model and the exact calls bench times for it, per batch size."""

    def __init__(self, name: str, bundle, cfg: BenchConfig, device: str, dtype: torch.dtype, embeddings):
        self.name, self.bundle, self.device = name, bundle, device
        fam, tr = bundle.family, bundle.transformer
        self.makes_images = bundle.vae is not None
        self.sampler, self.steps, self.guidance = settings(bundle, GenerateConfig(steps=cfg.steps, sampler=cfg.sampler))
        self.cfg = fam.uses_cfg(tr, self.guidance)
        self.hw = latent_hw(bundle, None, None)
        self.shape = (fam.latent_channels(tr), *self.hw)
        self.gcfg = GenerateConfig(labels=cfg.labels, prompts=cfg.prompts, num_images=cfg.num_images or None,
                                   steps=cfg.steps, sampler=cfg.sampler, seed=cfg.seed,
                                   batch_size=cfg.quality_batch_size, device=device, dtype=cfg.dtype,
                                   parallel=cfg.parallel, cache=cfg.cache)
        self.seed, self.dtype = cfg.seed, dtype
        self.cond = None  # (cond, uncond) rows per condition value, when this model has real conditioning
        if self.makes_images or fam.conditioning == "class" or embeddings is not None:
            values, cond, uncond = conditions(bundle, self.gcfg, device, embeddings)
            if self.cfg and uncond is None:
                raise ConfigError(f"{name}: guidance {self.guidance} needs unconditional embeddings; the embeddings "
                                  "file has no negative_* tensors")
            self.values, self.cond = values, (cond, uncond)
        if self.makes_images:
            make_scheduler(fam, bundle.scheduler, self.sampler)  # a bad --sampler fails before any work

    def _rows(self, b: int):
        cond, uncond = self.cond
        idx = [i % len(self.values) for i in range(b)]

        def pick(d):
            return None if d is None else {k: (v[idx].to(self.dtype) if v.is_floating_point() else v[idx])
                                           for k, v in d.items()}
        return pick(cond), (pick(uncond) if self.cfg else None)

    def step_call(self, b: int) -> Callable[[], object]:
        """One denoising step's transformer call for b images."""
        fam, tr = self.bundle.family, self.bundle.transformer
        rows = 2 * b if self.cfg else b
        if self.cond is None:  # bare text transformer without embeddings: the family's dummy conditioning
            x, t, both = fam.dummy_inputs(tr, rows, self.hw, self.seed)
        else:
            c, u = self._rows(b)
            x = image_noise(self.seed, list(range(b)), self.shape).to(self.device, self.dtype)
            if self.cfg:
                x, both = torch.cat([x, x]), {k: torch.cat([c[k], u[k]]) for k in c}
            else:
                both = c
            t = torch.full((rows,), 500.0, device=self.device)
        return lambda: fam.predict(tr, x, t, both, self.guidance)

    def image_call(self, b: int) -> Callable[[], object]:
        """Denoise + decode of b images at this model's own sampler and steps."""
        fam, bundle = self.bundle.family, self.bundle
        c, u = self._rows(b)
        noise = image_noise(self.seed, list(range(b)), self.shape).to(self.device)

        make_predict, _ = step_predictor(bundle, self.sampler, self.steps, self.guidance,  # feedback or cache, if any
                                         cache=self.gcfg.cache)

        def run():
            sched = make_scheduler(fam, bundle.scheduler, self.sampler)
            predict = make_predict() if make_predict else None
            return decode(bundle.vae, denoise(fam, bundle.transformer, sched, noise, c, u, self.guidance, self.steps,
                                              predict=predict))
        return run


def _resident_(bundle) -> None:
    """Copy CPU weights into process memory. safetensors loads them as file-backed mmaps, which the kernel
    may drop and re-read under memory pressure (page faults inside timed calls) and which make the
    resident set move with the page cache instead of with the model's own allocations."""
    for m in [bundle.transformer, *bundle.components.values()]:
        if isinstance(m, nn.Module):
            for t in [*m.parameters(), *m.buffers()]:
                if t.device.type == "cpu" and type(t.data) is torch.Tensor:  # a peer's tensor subclass is in memory
                    t.data = t.data.clone()


def _names(bundles) -> list[str]:
    seen, out = Counter(), []
    for b in bundles:
        seen[b.name] += 1
        out.append(b.name if seen[b.name] == 1 else f"{b.name} #{seen[b.name]}")
    return out
