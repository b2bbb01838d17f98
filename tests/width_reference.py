"""The hand-written width coupling that ditkit used before its width pruning moved to Torch-Pruning's
DependencyGraph (ops/prune/graph.py): per family, which state-dict tensor dimension belongs to which space
('D:' width D, 'H:' attention heads, 'F:' MLP units; chunked dimensions such as adaLN's 6 x D as repeats).
Kept here only as the reference tests/test_width_graph.py checks the graph's groups against.
"""
from __future__ import annotations

import re

import torch

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



TABLES = {
    "dit": (
        *linear(r"^pos_embed\.proj", None, "D:res"),
        *mlp2(rf"{TB}\.norm1\.emb\.timestep_embedder", "D:thid{b}", "D:emb{b}"),
        (rf"{TB}\.norm1\.emb\.class_embedder\.embedding_table\.weight$", 1, ("D:emb{b}",)),
        *linear(rf"{TB}\.norm1\.linear", "D:emb{b}", "D:res"),
        *attn(rf"{TB}\.attn1", "D:res", "D:res", "H:attn1.{b}", "D:res"),
        *ff(rf"{TB}\.ff", "D:res", "F:ff{b}"),
        *linear(r"^proj_out_1", "D:emb0", "D:res"),  # the final adaLN reads block 0's conditioning embedding
        *linear(r"^proj_out_2", "D:res", None),
    ),
    "pixart": (
        *linear(r"^pos_embed\.proj", None, "D:res"),
        # the timestep embedding is added to the final (2, D) scale-shift table: it lives in the residual space
        *mlp2(r"^adaln_single\.emb\.timestep_embedder", "D:thid", "D:res"),
        *linear(r"^adaln_single\.linear", "D:res", "D:res"),
        *mlp2(r"^caption_projection", "D:caphid", "D:cap"),
        (r"^(transformer_blocks\.\d+\.)?scale_shift_table$", 1, ("D:res",)),
        *attn(rf"{TB}\.attn1", "D:res", "D:res", "H:attn1.{b}", "D:res"),
        *attn(rf"{TB}\.attn2", "D:res", "D:cap", "H:attn2.{b}", "D:res"),
        *ff(rf"{TB}\.ff", "D:res", "F:ff{b}"),
        *linear(r"^proj_out", "D:res", None),
    ),
    "sd3": (
        *linear(r"^pos_embed\.proj", None, "D:res"),
        (r"^pos_embed\.pos_embed$", 2, ("D:res",)),
        *mlp2(r"^time_text_embed\.timestep_embedder", "D:thid", "D:cond"),
        *mlp2(r"^time_text_embed\.text_embedder", "D:phid", "D:cond"),
        *linear(r"^context_embedder", None, "D:ctx"),
        *linear(rf"{TB}\.norm1\.linear", "D:cond", "D:res"),
        *linear(rf"{TB}\.norm1_context\.linear", "D:cond", "D:ctx"),
        *attn(rf"{TB}\.attn", "D:res", "D:res", "H:attn.{b}", "D:res", added="D:ctx"),
        *ff(rf"{TB}\.ff", "D:res", "F:ff{b}"),
        *ff(rf"{TB}\.ff_context", "D:ctx", "F:ffc{b}"),
        *linear(r"^norm_out\.linear", "D:cond", "D:res"),
        *linear(r"^proj_out", "D:res", None),
    ),
    "flux": (
        *linear(r"^x_embedder", None, "D:res"),
        *linear(r"^context_embedder", None, "D:res"),
        *mlp2(r"^time_text_embed\.timestep_embedder", "D:thid", "D:cond"),
        *mlp2(r"^time_text_embed\.guidance_embedder", "D:ghid", "D:cond"),
        *mlp2(r"^time_text_embed\.text_embedder", "D:phid", "D:cond"),
        *linear(rf"{TB}\.norm1(_context)?\.linear", "D:cond", "D:res"),
        *attn(rf"{TB}\.attn", "D:res", "D:res", "H:attn.{b}", "D:res", added="D:res"),
        *ff(rf"{TB}\.ff", "D:res", "F:ff{b}"),
        *ff(rf"{TB}\.ff_context", "D:res", "F:ffc{b}"),
        *linear(rf"{SB}\.norm\.linear", "D:cond", "D:res"),
        *linear(rf"{SB}\.proj_mlp", "D:res", "F:sff{b}"),
        (rf"{SB}\.attn\.to_(q|k|v)\.weight$", 1, ("D:res",)),
        (rf"{SB}\.attn\.to_(q|k|v)\.{WB}$", 0, ("H:sattn.{b}",)),
        (rf"{SB}\.proj_out\.weight$", 1, ("H:sattn.{b}", "F:sff{b}")),  # cat(attention, MLP) -> D
        (rf"{SB}\.proj_out\.{WB}$", 0, ("D:res",)),
        *linear(r"^norm_out\.linear", "D:cond", "D:res"),
        *linear(r"^proj_out", "D:res", None),
    ),
}


def reference_spaces(family: str, tr) -> dict[str, dict[tuple[str, int], torch.Tensor]]:
    """space -> {(key, dim): (channels, reps) tensor indices}, from the hand-written table."""
    c = tr.config
    d = c.num_attention_heads * c.attention_head_dim
    sizes = {"D": d, "H": d, "F": 4 * d}
    state = tr.state_dict()
    out: dict[str, dict] = {}
    for pattern, dim, spaces in TABLES[family]:
        rx = re.compile(pattern)
        for key in state:
            m = rx.search(key)
            if m is None:
                continue
            b = m.groupdict().get("b")
            names = [s.replace("{b}", b) if b is not None else s for s in spaces]
            n = state[key].shape[dim]
            if len(names) == 1:
                per = sizes[names[0][0]]
                segs = [(names[0], n // per, per)]
            else:
                segs = [(s, 1, sizes[s[0]]) for s in names]
            off = 0
            for space, chunks, per in segs:
                out.setdefault(space, {})[(key, dim)] = torch.stack(
                    [torch.arange(per) + off + k * per for k in range(chunks)], 1)
                off += chunks * per
    return out
