"""The model authors' key layouts for Flux (Black Forest Labs) and SD3 (Stability), mapped to and from diffusers.

One table per family: a regex over diffusers keys -> the original key and the diffusers key's place in it.
Original tensors that diffusers splits (Flux's `img_attn.qkv`, `single_blocks.N.linear1` = q, k, v, mlp;
SD3's `x_block.attn.qkv`) are the diffusers pieces concatenated on dim 0 in the table's order; the final
adaLN projections are stored (shift, scale) where diffusers stores (scale, shift), as diffusers' own
converters (`convert_flux_transformer_checkpoint_to_diffusers`, `convert_sd3_transformer_checkpoint_to_diffusers`)
undo. Mapping back splits each original tensor by the diffusers model's own shapes, so it holds at any width
(diffusers' Flux converter hard-codes width 3072).

    to_original(family, state) -> state in the authors' keys (no `model.diffusion_model.` prefix)
    from_original(family, state, shapes) -> state in diffusers keys; shapes: diffusers key -> shape
"""
from __future__ import annotations

import re

import torch

from .errors import FormatError

SWAP = "swap"  # stored (shift, scale) in the original layout

_BLOCK = r"transformer_blocks\.(\d+)\."
_SINGLE = r"single_transformer_blocks\.(\d+)\."
_WB = r"(weight|bias)$"

# (diffusers regex, original template, part): part = index in a dim-0 concatenation, or SWAP, or None
FLUX: list[tuple[str, str, object]] = [
    (r"^time_text_embed\.timestep_embedder\.linear_1\." + _WB, r"time_in.in_layer.\1", None),
    (r"^time_text_embed\.timestep_embedder\.linear_2\." + _WB, r"time_in.out_layer.\1", None),
    (r"^time_text_embed\.text_embedder\.linear_1\." + _WB, r"vector_in.in_layer.\1", None),
    (r"^time_text_embed\.text_embedder\.linear_2\." + _WB, r"vector_in.out_layer.\1", None),
    (r"^time_text_embed\.guidance_embedder\.linear_1\." + _WB, r"guidance_in.in_layer.\1", None),
    (r"^time_text_embed\.guidance_embedder\.linear_2\." + _WB, r"guidance_in.out_layer.\1", None),
    (r"^context_embedder\." + _WB, r"txt_in.\1", None),
    (r"^x_embedder\." + _WB, r"img_in.\1", None),
    (r"^" + _BLOCK + r"norm1\.linear\." + _WB, r"double_blocks.\1.img_mod.lin.\2", None),
    (r"^" + _BLOCK + r"norm1_context\.linear\." + _WB, r"double_blocks.\1.txt_mod.lin.\2", None),
    (r"^" + _BLOCK + r"attn\.to_q\." + _WB, r"double_blocks.\1.img_attn.qkv.\2", 0),
    (r"^" + _BLOCK + r"attn\.to_k\." + _WB, r"double_blocks.\1.img_attn.qkv.\2", 1),
    (r"^" + _BLOCK + r"attn\.to_v\." + _WB, r"double_blocks.\1.img_attn.qkv.\2", 2),
    (r"^" + _BLOCK + r"attn\.add_q_proj\." + _WB, r"double_blocks.\1.txt_attn.qkv.\2", 0),
    (r"^" + _BLOCK + r"attn\.add_k_proj\." + _WB, r"double_blocks.\1.txt_attn.qkv.\2", 1),
    (r"^" + _BLOCK + r"attn\.add_v_proj\." + _WB, r"double_blocks.\1.txt_attn.qkv.\2", 2),
    (r"^" + _BLOCK + r"attn\.norm_q\.weight$", r"double_blocks.\1.img_attn.norm.query_norm.scale", None),
    (r"^" + _BLOCK + r"attn\.norm_k\.weight$", r"double_blocks.\1.img_attn.norm.key_norm.scale", None),
    (r"^" + _BLOCK + r"attn\.norm_added_q\.weight$", r"double_blocks.\1.txt_attn.norm.query_norm.scale", None),
    (r"^" + _BLOCK + r"attn\.norm_added_k\.weight$", r"double_blocks.\1.txt_attn.norm.key_norm.scale", None),
    (r"^" + _BLOCK + r"ff\.net\.0\.proj\." + _WB, r"double_blocks.\1.img_mlp.0.\2", None),
    (r"^" + _BLOCK + r"ff\.net\.2\." + _WB, r"double_blocks.\1.img_mlp.2.\2", None),
    (r"^" + _BLOCK + r"ff_context\.net\.0\.proj\." + _WB, r"double_blocks.\1.txt_mlp.0.\2", None),
    (r"^" + _BLOCK + r"ff_context\.net\.2\." + _WB, r"double_blocks.\1.txt_mlp.2.\2", None),
    (r"^" + _BLOCK + r"attn\.to_out\.0\." + _WB, r"double_blocks.\1.img_attn.proj.\2", None),
    (r"^" + _BLOCK + r"attn\.to_add_out\." + _WB, r"double_blocks.\1.txt_attn.proj.\2", None),
    (r"^" + _SINGLE + r"norm\.linear\." + _WB, r"single_blocks.\1.modulation.lin.\2", None),
    (r"^" + _SINGLE + r"attn\.to_q\." + _WB, r"single_blocks.\1.linear1.\2", 0),
    (r"^" + _SINGLE + r"attn\.to_k\." + _WB, r"single_blocks.\1.linear1.\2", 1),
    (r"^" + _SINGLE + r"attn\.to_v\." + _WB, r"single_blocks.\1.linear1.\2", 2),
    (r"^" + _SINGLE + r"proj_mlp\." + _WB, r"single_blocks.\1.linear1.\2", 3),
    (r"^" + _SINGLE + r"attn\.norm_q\.weight$", r"single_blocks.\1.norm.query_norm.scale", None),
    (r"^" + _SINGLE + r"attn\.norm_k\.weight$", r"single_blocks.\1.norm.key_norm.scale", None),
    (r"^" + _SINGLE + r"proj_out\." + _WB, r"single_blocks.\1.linear2.\2", None),
    (r"^proj_out\." + _WB, r"final_layer.linear.\1", None),
    (r"^norm_out\.linear\." + _WB, r"final_layer.adaLN_modulation.1.\1", SWAP),
]

SD3: list[tuple[str, str, object]] = [
    (r"^pos_embed\.pos_embed$", "pos_embed", None),
    (r"^pos_embed\.proj\." + _WB, r"x_embedder.proj.\1", None),
    (r"^time_text_embed\.timestep_embedder\.linear_1\." + _WB, r"t_embedder.mlp.0.\1", None),
    (r"^time_text_embed\.timestep_embedder\.linear_2\." + _WB, r"t_embedder.mlp.2.\1", None),
    (r"^time_text_embed\.text_embedder\.linear_1\." + _WB, r"y_embedder.mlp.0.\1", None),
    (r"^time_text_embed\.text_embedder\.linear_2\." + _WB, r"y_embedder.mlp.2.\1", None),
    (r"^context_embedder\." + _WB, r"context_embedder.\1", None),
    (r"^" + _BLOCK + r"attn\.to_q\." + _WB, r"joint_blocks.\1.x_block.attn.qkv.\2", 0),
    (r"^" + _BLOCK + r"attn\.to_k\." + _WB, r"joint_blocks.\1.x_block.attn.qkv.\2", 1),
    (r"^" + _BLOCK + r"attn\.to_v\." + _WB, r"joint_blocks.\1.x_block.attn.qkv.\2", 2),
    (r"^" + _BLOCK + r"attn\.add_q_proj\." + _WB, r"joint_blocks.\1.context_block.attn.qkv.\2", 0),
    (r"^" + _BLOCK + r"attn\.add_k_proj\." + _WB, r"joint_blocks.\1.context_block.attn.qkv.\2", 1),
    (r"^" + _BLOCK + r"attn\.add_v_proj\." + _WB, r"joint_blocks.\1.context_block.attn.qkv.\2", 2),
    (r"^" + _BLOCK + r"attn\.norm_q\.weight$", r"joint_blocks.\1.x_block.attn.ln_q.weight", None),
    (r"^" + _BLOCK + r"attn\.norm_k\.weight$", r"joint_blocks.\1.x_block.attn.ln_k.weight", None),
    (r"^" + _BLOCK + r"attn\.norm_added_q\.weight$", r"joint_blocks.\1.context_block.attn.ln_q.weight", None),
    (r"^" + _BLOCK + r"attn\.norm_added_k\.weight$", r"joint_blocks.\1.context_block.attn.ln_k.weight", None),
    (r"^" + _BLOCK + r"attn\.to_out\.0\." + _WB, r"joint_blocks.\1.x_block.attn.proj.\2", None),
    (r"^" + _BLOCK + r"attn\.to_add_out\." + _WB, r"joint_blocks.\1.context_block.attn.proj.\2", None),
    (r"^" + _BLOCK + r"attn2\.to_q\." + _WB, r"joint_blocks.\1.x_block.attn2.qkv.\2", 0),
    (r"^" + _BLOCK + r"attn2\.to_k\." + _WB, r"joint_blocks.\1.x_block.attn2.qkv.\2", 1),
    (r"^" + _BLOCK + r"attn2\.to_v\." + _WB, r"joint_blocks.\1.x_block.attn2.qkv.\2", 2),
    (r"^" + _BLOCK + r"attn2\.norm_q\.weight$", r"joint_blocks.\1.x_block.attn2.ln_q.weight", None),
    (r"^" + _BLOCK + r"attn2\.norm_k\.weight$", r"joint_blocks.\1.x_block.attn2.ln_k.weight", None),
    (r"^" + _BLOCK + r"attn2\.to_out\.0\." + _WB, r"joint_blocks.\1.x_block.attn2.proj.\2", None),
    (r"^" + _BLOCK + r"norm1\.linear\." + _WB, r"joint_blocks.\1.x_block.adaLN_modulation.1.\2", None),
    # the last block's context stream ends in a continuous adaLN (diffusers: scale, shift); the others do not
    (r"^" + _BLOCK + r"norm1_context\.linear\." + _WB, r"joint_blocks.\1.context_block.adaLN_modulation.1.\2",
     "swap-if-last"),
    (r"^" + _BLOCK + r"ff\.net\.0\.proj\." + _WB, r"joint_blocks.\1.x_block.mlp.fc1.\2", None),
    (r"^" + _BLOCK + r"ff\.net\.2\." + _WB, r"joint_blocks.\1.x_block.mlp.fc2.\2", None),
    (r"^" + _BLOCK + r"ff_context\.net\.0\.proj\." + _WB, r"joint_blocks.\1.context_block.mlp.fc1.\2", None),
    (r"^" + _BLOCK + r"ff_context\.net\.2\." + _WB, r"joint_blocks.\1.context_block.mlp.fc2.\2", None),
    (r"^proj_out\." + _WB, r"final_layer.linear.\1", None),
    (r"^norm_out\.linear\." + _WB, r"final_layer.adaLN_modulation.1.\1", SWAP),
]

TABLES = {"flux": FLUX, "sd3": SD3}
LAYOUTS = {"flux": "bfl-flux", "sd3": "stability-sd3"}  # the names ditkit gives these layouts
PREFIX = "model.diffusion_model."


def has_original_layout(family: str) -> bool:
    return family in TABLES


def _plan(family: str, keys) -> dict[str, list[tuple[object, str]]]:
    """original key -> [(part, diffusers key)] in concatenation order."""
    keys = set(keys)
    table = [(re.compile(rx), tmpl, part) for rx, tmpl, part in TABLES[family]]
    plan: dict[str, list[tuple[object, str]]] = {}
    for k in sorted(keys):
        for rx, tmpl, part in table:
            m = rx.match(k)
            if m is None:
                continue
            if part == "swap-if-last":  # the last SD3 block has no context feed-forward
                part = SWAP if f"transformer_blocks.{m.group(1)}.ff_context.net.2.weight" not in keys else None
            plan.setdefault(m.expand(tmpl), []).append((part, k))
            break
        else:
            raise FormatError(f"the {family} key {k!r} has no place in the {LAYOUTS[family]} layout; "
                              "export it with --format safetensors or diffusers")
    for group in plan.values():
        group.sort(key=lambda pk: pk[0] if isinstance(pk[0], int) else -1)
    return plan


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_original(family: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers keys -> the authors' keys (Flux: BFL, SD3: Stability)."""
    out = {}
    for okey, group in _plan(family, state).items():
        if len(group) > 1:
            out[okey] = torch.cat([state[k] for _, k in group], dim=0)
        else:
            part, k = group[0]
            out[okey] = _swap(state[k]) if part == SWAP else state[k]
    return out


def from_original(family: str, state: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The authors' keys -> diffusers keys, split by `shapes` (the diffusers model's state-dict shapes)."""
    state = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in state.items()}
    plan = _plan(family, shapes)
    missing = [k for k in plan if k not in state]
    unexpected = [k for k in state if k not in plan]
    if missing or unexpected:
        raise FormatError(f"weights do not match the {family} config in the {LAYOUTS[family]} layout "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]})")
    out = {}
    for okey, group in plan.items():
        t = state[okey]
        if len(group) > 1:
            sizes = [shapes[k][0] for _, k in group]
            if sum(sizes) != t.shape[0]:
                raise FormatError(f"{okey} has {t.shape[0]} rows where the config needs {sum(sizes)}")
            for (_, k), piece in zip(group, torch.split(t, sizes, dim=0)):
                out[k] = piece
        else:
            part, k = group[0]
            out[k] = _swap(t) if part == SWAP else t
    return out
