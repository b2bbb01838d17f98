"""pab (diffusers Pyramid Attention Broadcast): attention outputs are reused for `skip_range - 1` calls out of
`skip_range` inside diffusers' default timestep window (100, 800); self- and cross-attention get the same range.
Only attention is skipped, so the reachable speedup is bounded by attention's share of a step."""
from __future__ import annotations

from .methods import Knob

SOURCE = "diffusers"
KNOB = Knob("skip_range", 2, 0, integer=True)  # hi 0: up to the step count


def params(fitted, value, steps) -> dict:
    return {"skip_range": int(value)}


def runtime(bundle, params, steps, guidance):
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

    from .stack import hooked_predict

    now = {"t": 1000}
    k = int(params["skip_range"])
    cfg = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=k, cross_attention_block_skip_range=k,
                                          current_timestep_callback=lambda: now["t"])

    def on_step(i, t):
        now["t"] = int(t.flatten()[0])
    return lambda: hooked_predict(bundle, guidance, steps, lambda tr: apply_pyramid_attention_broadcast(tr, cfg),
                                  (_PYRAMID_ATTENTION_BROADCAST_HOOK,), on_step=on_step)
