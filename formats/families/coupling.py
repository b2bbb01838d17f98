"""What a family declares for width pruning (ops/prune/width.py cuts, ops/prune/graph.py finds the coupling).

The coupling itself (which tensor dimensions go with which channel) is found by Torch-Pruning's
DependencyGraph on the real module; a family says only what the graph cannot infer.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WidthSpec:
    sincos_residual: bool  # the position table is recomputed from the width on load (DiT, PixArt)
    width_fields: tuple[str, ...] = ()  # config fields besides num_attention_heads that hold the width D
    mlp_mult: int = 4  # MLP hidden units per channel of D, as diffusers builds them from the config
    ignored: tuple[str, ...] = ("proj_out",)  # module names whose outputs keep their width (the latent channels)
    unwrapped: tuple[tuple[str, int], ...] = ()  # name regexes of tensors outside standard modules, pruning dim
    ignored_params: tuple[str, ...] = ()  # parameter-name regexes that act on a fixed axis (head_dim norms)
    patch_embed: str = "pos_embed.proj"  # the module whose outputs are the residual stream (sin-cos alignment)
    # None: heads, the width D and the MLP are cut together (D' = h' x head_dim, the usual configs). A reason:
    # only the MLP hidden units are cut (heads and D kept), the family's `mlp_config` writes the new MLP width,
    # and the plan says why heads stay
    mlp_only: str | None = None

    def config(self, d: int) -> dict:
        """The config fields besides num_attention_heads for the new width d."""
        return {k: d for k in self.width_fields}
