"""A seeded calibration set and the two error measurements: per layer and whole output.

Per layer: each quantized layer is run on the very input its float original receives inside the float
model (a forward hook), so its SQNR is its own error, not the error accumulated before it.
Whole output: the quantized model against the float model on the same calibration inputs.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Energy


def calibration_set(family, transformer, batches: int, batch_size: int, seed: int) -> list[tuple]:
    """`batches` x (latents, t, cond) from family.dummy_inputs, seeds seed..seed+batches-1, with the
    timesteps of all samples spread evenly over (0, 1000) so early and late denoising steps both count."""
    n = batches * batch_size
    steps = [int((k + 0.5) * 1000 / n) for k in range(n)]  # e.g. n=8: 62, 187, ..., 937
    out = []
    for b in range(batches):
        latents, t, cond = family.dummy_inputs(transformer, batch_size, seed=seed + b)
        t = torch.tensor(steps[b * batch_size:(b + 1) * batch_size], dtype=t.dtype, device=t.device)
        out.append((latents, t, cond))
    return out


@torch.no_grad()
def outputs(family, transformer, calib: list[tuple]) -> list[torch.Tensor]:
    return [family.predict(transformer, x, t, c).float().cpu() for x, t, c in calib]


@torch.no_grad()
def reference_and_layer_error(family, transformer, calib: list[tuple],
                              quantized: dict[str, nn.Module]) -> tuple[list[torch.Tensor], dict[str, Energy]]:
    """Float outputs on `calib`, and each quantized module's error on its float original's inputs."""
    energy = {name: Energy() for name in quantized}
    handles = []

    def hook(name):
        def fn(module, args, out):
            energy[name].add(out, quantized[name](*args))
        return fn

    for name in quantized:
        handles.append(transformer.get_submodule(name).register_forward_hook(hook(name)))
    try:
        ref = outputs(family, transformer, calib)
    finally:
        for h in handles:
            h.remove()
    return ref, energy


def output_error(ref: list[torch.Tensor], out: list[torch.Tensor]) -> Energy:
    e = Energy()
    for r, o in zip(ref, out):
        e.add(r, o)
    return e
