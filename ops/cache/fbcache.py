"""fbcache (diffusers FirstBlockCache): the first block always runs; when its residual changed by less than
`threshold` (relative mean absolute difference) since the last full step, the other blocks reuse their cached
residual. diffusers' hooks, with the cache context each call needs (ops/cache/stack.hooked_predict), registered
the way `apply_first_block_cache` does but over `stack.hookable_chain` (SD3's last block stays outside)."""
from __future__ import annotations

from .methods import Knob

SOURCE = "diffusers"
KNOB = Knob("threshold", 1e-3, 2.0)


def unsupported(bundle) -> str | None:
    from .stack import hookable_chain

    if hasattr(bundle.transformer, "modules") and len(hookable_chain(bundle.family, bundle.transformer)) < 2:
        return ("FirstBlockCache needs a first block and at least one more to skip (a last block built "
                "differently, as SD3's, stays outside)")
    return None


def params(fitted, value, steps) -> dict:
    return {"threshold": float(value)}


def runtime(bundle, params, steps, guidance):
    from diffusers.hooks import FirstBlockCacheConfig
    from diffusers.hooks.first_block_cache import (_FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK, FBCSharedBlockState,
                                                   StateManager, _apply_fbc_block_hook, _apply_fbc_head_block_hook)

    from .stack import hookable_chain, hooked_predict

    cfg = FirstBlockCacheConfig(threshold=float(params["threshold"]))

    def apply(tr):  # apply_first_block_cache's registration, over the hookable chain
        blocks = hookable_chain(bundle.family, tr)
        state = StateManager(FBCSharedBlockState, (), {})
        _apply_fbc_head_block_hook(blocks[0], state, cfg.threshold)
        for b in blocks[1:-1]:
            _apply_fbc_block_hook(b, state)
        _apply_fbc_block_hook(blocks[-1], state, is_tail=True)
    return lambda: hooked_predict(bundle, guidance, steps, apply, (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK))
