"""magcache (diffusers MagCache): skips a step while the accumulated error predicted by the residual-magnitude
ratios stays under `threshold`. The ratios are what MagCache's calibrate mode computes (mean over tokens of
||r_t|| / ||r_t-1||, r the residual of the whole block chain), taken here from the model's own uncached
calibration trajectories; max_skip_steps and retention_ratio are diffusers' defaults."""
from __future__ import annotations

import torch

from .methods import Knob

SOURCE = "diffusers"
KNOB = Knob("threshold", 1e-3, 5.0)


def fit(records, steps) -> dict:
    ratios = [1.0]
    for prev, cur in zip(records, records[1:]):
        a, b = torch.linalg.norm(cur["r_h"].float(), dim=-1), torch.linalg.norm(prev["r_h"].float(), dim=-1)
        ratios.append(round(float((a / (b + 1e-8)).mean()), 6))
    return {"mag_ratios": ratios}


def params(fitted, value, steps) -> dict:
    return {"threshold": float(value), "mag_ratios": list(fitted["mag_ratios"])}


def runtime(bundle, params, steps, guidance):
    from diffusers.hooks import HookRegistry, MagCacheConfig
    from diffusers.hooks.mag_cache import (_MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK, MagCacheState,
                                           StateManager, _apply_mag_cache_block_hook, _apply_mag_cache_head_hook)

    from .stack import hookable_chain, hooked_predict

    cfg = MagCacheConfig(threshold=float(params["threshold"]), mag_ratios=list(params["mag_ratios"]),
                         num_inference_steps=steps)

    def apply(tr):  # apply_mag_cache's registration, over the hookable chain (SD3's last block outside)
        HookRegistry.check_if_exists_or_initialize(tr)
        blocks = hookable_chain(bundle.family, tr)
        state = StateManager(MagCacheState, (), {})
        if len(blocks) == 1:
            _apply_mag_cache_block_hook(blocks[0], state, cfg, is_tail=True)
            _apply_mag_cache_head_hook(blocks[0], state, cfg)
            return
        _apply_mag_cache_head_hook(blocks[0], state, cfg)
        for b in blocks[1:-1]:
            _apply_mag_cache_block_hook(b, state, cfg)
        _apply_mag_cache_block_hook(blocks[-1], state, cfg, is_tail=True)
    return lambda: hooked_predict(bundle, guidance, steps, apply, (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK))
