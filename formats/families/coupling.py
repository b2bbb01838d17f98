"""The vocabulary family files use to say what width pruning cuts together (ops/prune/width.py does the cut).

A rule is (state-dict key regex, dim, spaces concatenated along that dim). Spaces are 'D:' (width D, the
residual stream and the spaces as wide as it), 'H:' (attention heads) and 'F:' (MLP hidden units); "{b}" in a
space name is the regex's block index, so each block's heads and MLP units form their own group. A single
space may repeat along a dim (adaLN's 6 x D modulation chunks).
"""
from __future__ import annotations

from dataclasses import dataclass

B = r"(?P<b>\d+)"
WB = r"(weight|bias)"
TB = rf"^transformer_blocks\.{B}"  # the usual block list
SB = rf"^single_transformer_blocks\.{B}"  # Flux's single-stream blocks

Rule = tuple[str, int, tuple[str, ...]]


def attn(prefix: str, q_in: str, kv_in: str, heads: str, out: str, added: str | None = None) -> list[Rule]:
    """q/k/v projections -> heads; output projection heads -> `out`; optional joint-attention context side."""
    rules = [
        (rf"{prefix}\.to_q\.weight$", 1, (q_in,)),
        (rf"{prefix}\.to_(k|v)\.weight$", 1, (kv_in,)),
        (rf"{prefix}\.to_(q|k|v)\.{WB}$", 0, (heads,)),
        (rf"{prefix}\.to_out\.0\.weight$", 1, (heads,)),
        (rf"{prefix}\.to_out\.0\.{WB}$", 0, (out,)),
    ]
    if added is not None:
        rules += [
            (rf"{prefix}\.add_(q|k|v)_proj\.weight$", 1, (added,)),
            (rf"{prefix}\.add_(q|k|v)_proj\.{WB}$", 0, (heads,)),
            (rf"{prefix}\.to_add_out\.weight$", 1, (heads,)),
            (rf"{prefix}\.to_add_out\.{WB}$", 0, (added,)),
        ]
    return rules


def ff(prefix: str, io: str, hidden: str) -> list[Rule]:
    """diffusers FeedForward: net.0.proj (io -> hidden), net.2 (hidden -> io)."""
    return [
        (rf"{prefix}\.net\.0\.proj\.weight$", 1, (io,)),
        (rf"{prefix}\.net\.0\.proj\.{WB}$", 0, (hidden,)),
        (rf"{prefix}\.net\.2\.weight$", 1, (hidden,)),
        (rf"{prefix}\.net\.2\.{WB}$", 0, (io,)),
    ]


def mlp2(prefix: str, hidden: str, out: str) -> list[Rule]:
    """A two-layer embedder (TimestepEmbedding, PixArtAlphaTextProjection): input width fixed."""
    return [
        (rf"{prefix}\.linear_1\.{WB}$", 0, (hidden,)),
        (rf"{prefix}\.linear_2\.weight$", 1, (hidden,)),
        (rf"{prefix}\.linear_2\.{WB}$", 0, (out,)),
    ]


def linear(prefix: str, inp: str | None, out: str | None) -> list[Rule]:
    rules = []
    if inp is not None:
        rules.append((rf"{prefix}\.weight$", 1, (inp,)))
    if out is not None:
        rules.append((rf"{prefix}\.{WB}$", 0, (out,)))
    return rules


@dataclass(frozen=True)
class WidthSpec:
    rules: tuple[Rule, ...]
    sincos_residual: bool  # the position table is recomputed from the width on load (DiT, PixArt)
    # what Torch-Pruning's DependencyGraph cannot infer (ops/prune/graph.py):
    ignored: tuple[str, ...] = ("proj_out",)  # module names whose outputs keep their width (the latent channels)
    unwrapped: tuple[tuple[str, int], ...] = ()  # name regexes of tensors outside standard modules, pruning dim
    ignored_params: tuple[str, ...] = ()  # parameter-name regexes that act on a fixed axis (head_dim norms)
    width_fields: tuple[str, ...] = ()  # config fields besides num_attention_heads that hold the width D
    mlp_mult: int = 4  # MLP hidden units per channel of D, as diffusers builds them from the config

    def config(self, d: int) -> dict:
        """The config fields besides num_attention_heads for the new width d."""
        return {k: d for k in self.width_fields}
