"""Structured surgery ends here: the pruned architecture is rebuilt by diffusers from the rewritten config and
loaded with the sliced state dict (strict), so the model in memory is exactly what a reload builds."""
from __future__ import annotations

import torch
from torch import nn


def rebuild(transformer: nn.Module, config_updates: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new transformer of the same class from `transformer.config` + `config_updates`, holding `state`."""
    from accelerate import init_empty_weights

    cls = type(transformer)
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    config.update(config_updates)
    p = next(transformer.parameters())
    with init_empty_weights(include_buffers=False):  # parameters on 'meta': no random init of big models
        model = cls.from_config(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # a key or shape the surgery did not cover: a ditkit bug, never user input
        raise RuntimeError(f"pruned weights do not fit the rewritten {cls.__name__} config: "
                           f"{str(e).splitlines()[0][:300]}") from e
    # sinusoidal-embedding settings the config does not hold (DiT's timestep shift, Family.conventions) go along
    from diffusers.models.embeddings import Timesteps

    old = dict(transformer.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, Timesteps) and isinstance(old.get(name), Timesteps):
            m.downscale_freq_shift = old[name].downscale_freq_shift
    # buffers not in the state dict (DiT/PixArt sin-cos tables) were built by the config on the CPU in fp32
    model.to(p.device)
    for b in model.buffers():
        if b.is_floating_point() and b.dtype != p.dtype:
            model.to(p.dtype)
            break
    return model.eval().requires_grad_(False)
