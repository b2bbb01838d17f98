"""The sampler shared by every family: per-image seeded noise, a diffusers scheduler, CFG, VAE decode.

Each image's noise depends only on (seed, image index), never on batch size or process count, and all
registered samplers are deterministic, so an image is the same however the work is split.

Identical noise is not enough for identical pixels: CPU kernels pick other code paths for some row
counts (MKL's GEMM for fewer than 12 rows that are not a multiple of 4; oneDNN's convolutions per batch
size), which moves results by an ulp that 25 steps can carry into a pixel. So the transformer always
sees a multiple of BATCH_QUANTUM images (the last batch padded with a repeat, then dropped) and the VAE
always decodes the same number of latents per call (`vae_quantum`: one on CPU, where one latent alone is also the
cheapest per image, BATCH_QUANTUM elsewhere); per-row results are then bit-identical for any
--batch-size (tests/test_generate.py checks 1, 7 and 8 against each other). The per-image conditioning
layers (timestep, class and pooled-text embeddings, adaLN modulation) multiply only one row per image, and
MKL takes another code path for few rows (measured: fewer than 16 rows on an AVX512 Xeon, fewer than 12 on
an AVX2 EPYC), so on CPU every linear layer sees at least MIN_ROWS rows (`row_floor`: its input padded with
a repeated row, the output cut back; not inside torch.compile'd regions, which run their own kernels). oneDNN's convolutions also
change with the thread count (a launcher gives each process one thread), so on CPU the VAE runs
PyTorch's own convolution (about 1.3x slower for tiny-digits' VAE, which runs once per image, not per
step): one process and `torchrun --nproc_per_node 2` then write the same pixels.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ditkit.formats.errors import ConfigError, choice_error
from ditkit.formats.families import Family

# name -> (diffusers scheduler class, overrides, families' prediction kind)
SAMPLERS: dict[str, tuple[str, dict, str]] = {
    "ddim": ("DDIMScheduler", {}, "epsilon"),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "epsilon"),
    "euler": ("EulerDiscreteScheduler", {}, "epsilon"),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}, "flow"),
}

# a scheduler config for bundles that ship none (bare transformers)
DEFAULT_SCHEDULER = {
    "epsilon": ("DDPMScheduler", {"num_train_timesteps": 1000, "beta_schedule": "linear",
                                  "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon"}),
    "flow": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
}


def make_scheduler(family: Family, base_scheduler, sampler: str):
    import diffusers

    if sampler not in SAMPLERS:
        raise choice_error("sampler", sampler, SAMPLERS)
    if sampler not in family.samplers:
        raise ConfigError(f"sampler {sampler!r} does not fit the {family.name} family; choose one of: "
                          f"{', '.join(family.samplers)}")
    cls_name, overrides, _ = SAMPLERS[sampler]
    if base_scheduler is not None:
        config = dict(base_scheduler.config)
    else:
        _, config = DEFAULT_SCHEDULER[family.prediction]
    if base_scheduler is None or type(base_scheduler).__name__ != cls_name:
        config = {**config, **overrides}
    return _fresh(getattr(diffusers, cls_name), config)


_PROTOTYPES: dict[tuple[str, str], object] = {}


def _fresh(cls, config: dict):
    """A new, unused scheduler of `cls` from `config`: a copy of one built once per (class, config). diffusers'
    `from_config` inspects signatures on every call (0.6 ms on tiny-digits' DDIM, CPU), which a 2-step image
    paid once per image; the copy takes about 0.1 ms and starts in the same state."""
    key = (cls.__name__, json.dumps(config, sort_keys=True, default=repr))
    proto = _PROTOTYPES.get(key)
    if proto is None:
        proto = _PROTOTYPES[key] = cls.from_config(config)
    return copy.deepcopy(proto)


BATCH_QUANTUM = 4
MIN_ROWS = 16  # rows below which MKL's GEMM changes code path (see the module note)


def padded(n: int) -> int:
    """`n` rounded up to a multiple of BATCH_QUANTUM."""
    return -(-n // BATCH_QUANTUM) * BATCH_QUANTUM


def vae_quantum(device: torch.device | str) -> int:
    """Latents per VAE call. CPU: one (tiny-digits' decoder without oneDNN: 2.9 ms for one latent alone, 12.2 ms
    for four in one call, tools/sampler_costs.py; a single image no longer pays for three padding rows); elsewhere BATCH_QUANTUM."""
    return 1 if torch.device(device).type == "cpu" else BATCH_QUANTUM


def pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """`x` with its last row repeated up to `n` rows."""
    return x if x.shape[0] >= n else torch.cat([x, x[-1:].expand(n - x.shape[0], *x.shape[1:])])


class row_floor:
    """On CPU, every nn.Linear of `model` multiplies at least MIN_ROWS rows while the context is open, so a
    row's result never depends on how many other images share its batch (see the module note). A layer that
    sees enough rows at its first call drops its hooks (its row count is fixed within one sampling loop), so
    only the per-image layers pay the padding."""

    def __init__(self, model):
        self.model, self.handles = model, {}

    def _pad(self, module, args):
        x = args[0]
        rows = x.numel() // max(x.shape[-1], 1)
        if rows >= MIN_ROWS or rows == 0:
            for h in self.handles.pop(module, ()):
                h.remove()
            return None
        module._ditkit_rows = (rows, x.shape[:-1])
        return (pad_rows(x.reshape(rows, x.shape[-1]), MIN_ROWS),) + tuple(args[1:])

    @staticmethod
    def _cut(module, args, out):
        kept = module.__dict__.pop("_ditkit_rows", None)
        if kept is None:
            return None
        rows, lead = kept
        return out[:rows].reshape(*lead, out.shape[-1])

    def __enter__(self):
        p = next(self.model.parameters(), None) if isinstance(self.model, torch.nn.Module) else None
        if p is not None and p.device.type == "cpu":
            # a compiled region (ops/compile.py) runs inductor's kernels, and a hook added or removed there
            # would recompile it: its layers are left alone
            compiled = {id(s) for m in self.model.modules() if m.__dict__.get("_ditkit_compiled") for s in m.modules()}
            for m in self.model.modules():
                if type(m) is torch.nn.Linear and id(m) not in compiled:
                    self.handles[m] = (m.register_forward_pre_hook(self._pad), m.register_forward_hook(self._cut))
        return self

    def __exit__(self, *exc):
        for hs in self.handles.values():
            for h in hs:
                h.remove()
        self.handles = {}
        return False


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image `index` of a run seeded `seed` (SeedSequence mixes both)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def image_noise(seed: int, indices: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, i)))
                        for i in indices])


def _set_timesteps(sched, steps: int, latents: torch.Tensor, device):
    kwargs = {}
    if getattr(sched.config, "use_dynamic_shifting", False):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = sched.config
        seq = (latents.shape[-1] // 2) * (latents.shape[-2] // 2)
        kwargs["mu"] = calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                       c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    sched.set_timesteps(steps, device=device, **kwargs)


def _cat(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


@torch.no_grad()
def denoise(family: Family, transformer, sched, noise: torch.Tensor, cond: dict, uncond: dict | None,
            guidance: float, steps: int, on_step: Callable[[], None] | None = None,
            predict: Callable | None = None, snapshot: Callable | None = None,
            start: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Run the reverse process from `noise` (B, C, h, w); returns the final latents.

    `predict(latents, t, cond) -> output` replaces the transformer call (e.g. an onnxruntime session).
    `snapshot(i, latents, sched)` sees the state before step i; `start=(i, latents)` with a copy of that `sched`
    (its timesteps set, its state at step i) runs steps i.. only: the same final latents, bit for bit.
    """
    predict = predict or (lambda x, t, c: family.predict(transformer, x, t, c, guidance))
    p = next(transformer.parameters(), None) if transformer is not None else None
    dtype = p.dtype if p is not None else torch.float32
    device = noise.device
    if start is None:
        _set_timesteps(sched, steps, noise, device)
        first, latents = 0, noise * getattr(sched, "init_noise_sigma", 1.0)  # flow schedulers: unit noise
    else:
        first, latents = start
    scale = getattr(sched, "scale_model_input", lambda x, t: x)
    cfg = uncond is not None
    both = _cat(cond, uncond) if cfg else cond
    with row_floor(transformer):
        for i, t in enumerate(sched.timesteps):
            if i < first:
                continue
            if snapshot is not None:
                snapshot(i, latents, sched)
            x = scale(latents, t)
            x = torch.cat([x, x]) if cfg else x
            tt = t.expand(x.shape[0]).to(device)
            out = predict(x.to(dtype), tt, both).float()
            if cfg:
                c, u = out.chunk(2)
                out = u + guidance * (c - u)
            latents = sched.step(out, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step()
    return latents


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """Latents -> uint8 images (N, H, W, 3), `vae_quantum` latents per VAE call (see the module note).
    Without a VAE, the first latent channels are shown."""
    q = vae_quantum(latents.device)
    if vae is not None and latents.shape[0] != q:
        n = latents.shape[0]
        chunks = [pad_rows(latents[i:i + q], q) for i in range(0, n, q)]
        return np.concatenate([decode(vae, c) for c in chunks])[:n]
    if vae is None:
        x = latents[:, :3] if latents.shape[1] >= 3 else latents[:, :1].repeat(1, 3, 1, 1)
        x = x / 4.0  # unit-variance latents into roughly [-1, 1]
    else:
        c = vae.config
        z = latents / c.scaling_factor
        if getattr(c, "shift_factor", None):
            z = z + c.shift_factor
        with torch.backends.mkldnn.flags(enabled=z.device.type != "cpu"):  # thread-count invariant on CPU
            x = vae.decode(z.to(vae.dtype), return_dict=False)[0].float()
    x = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class Request:
    """What to sample: one entry per image (class label or prompt index), and the sampler settings."""
    sampler: str
    steps: int
    guidance: float
    seed: int
    latent_hw: tuple[int, int]
