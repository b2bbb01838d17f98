"""The facebookresearch/DiT checkpoint layout <-> diffusers DiTTransformer2DModel keys.

The original DiT has one timestep embedder and one label embedder shared by all blocks; diffusers keeps a
copy in every block (transformer_blocks.{i}.norm1.emb). Reading copies them in; writing takes block 0's
and refuses if the copies differ (the original layout cannot hold them).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .errors import FormatError

# hidden size -> heads of the published DiT-S/B/L/XL configs (the head count is not in the weights)
HEADS_BY_HIDDEN = {384: 6, 768: 12, 1024: 16, 1152: 16}

_EMB = "transformer_blocks.{i}.norm1.emb."
_SHARED = {
    "t_embedder.mlp.0.": "timestep_embedder.linear_1.",
    "t_embedder.mlp.2.": "timestep_embedder.linear_2.",
    "y_embedder.embedding_table.": "class_embedder.embedding_table.",
}
_BLOCK = {
    "adaLN_modulation.1.": "norm1.linear.",
    "attn.proj.": "attn1.to_out.0.",
    "mlp.fc1.": "ff.net.0.proj.",
    "mlp.fc2.": "ff.net.2.",
}
_TOP = {
    "x_embedder.proj.": "pos_embed.proj.",
    "final_layer.adaLN_modulation.1.": "proj_out_1.",
    "final_layer.linear.": "proj_out_2.",
}


def unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """A DiT .pt is a state dict, or a training checkpoint holding one under 'ema' / 'model'."""
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FormatError(f"{path} is not a DiT state dict (expected a dict of tensors, optionally under 'ema')")
    if "x_embedder.proj.weight" not in obj:
        raise FormatError(f"{path} does not look like a facebookresearch/DiT checkpoint (no x_embedder.proj.weight)")
    return obj


def _depth(keys, pattern: str) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(idx) + 1 if idx else 0


def to_diffusers(sd: dict[str, torch.Tensor], path: Path, heads: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) for DiTTransformer2DModel from an original DiT state dict; `heads` for a width
    that is not one of the published DiT-S/B/L/XL (the head count is not in the weights)."""
    from .errors import ConfigError

    for key in ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight",
                "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise FormatError(f"{path}: a dit-original checkpoint without {key}; the file is incomplete")
    w = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = _depth(sd, r"blocks\.(\d+)\.")
    heads = heads or HEADS_BY_HIDDEN.get(hidden)
    if heads is None:
        raise ConfigError(f"{path}: a dit-original checkpoint of width {hidden}: its head count is not in the "
                          f"weights (published DiT widths: {sorted(HEADS_BY_HIDDEN)}); pass --config config.json "
                          "with num_attention_heads")
    if hidden % heads:
        raise FormatError(f"{path}: width {hidden} does not split into {heads} heads; fix num_attention_heads")
    out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    if "pos_embed" in sd:
        tokens = sd["pos_embed"].shape[1]
    else:
        raise FormatError(f"{path}: no pos_embed buffer, cannot tell the input size")
    side = int(math.isqrt(tokens)) * patch
    classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    mlp = sd["blocks.0.mlp.fc1.weight"].shape[0]
    if mlp != 4 * hidden:
        raise FormatError(f"{path}: MLP width {mlp} is not 4x hidden; diffusers' DiT cannot hold it")
    config = {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": heads, "attention_head_dim": hidden // heads, "in_channels": in_ch,
        "out_channels": out_ch, "num_layers": depth, "sample_size": side, "patch_size": patch,
        "num_embeds_ada_norm": classes,
    }
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == "pos_embed":
            continue  # fixed sin-cos table, recomputed by diffusers
        if any(k.startswith(p) for p in _SHARED):
            continue
        if any(k.startswith(p) for p in _TOP):
            p = next(p for p in _TOP if k.startswith(p))
            out[_TOP[p] + k[len(p):]] = v
            continue
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        if not m:
            raise FormatError(f"{path}: unexpected key {k!r} for a DiT checkpoint")
        i, rest = m.group(1), m.group(2)
        if rest.startswith("attn.qkv."):
            suffix = rest[len("attn.qkv."):]
            q, kk, vv = v.chunk(3, dim=0)
            for name, t in (("to_q", q), ("to_k", kk), ("to_v", vv)):
                out[f"transformer_blocks.{i}.attn1.{name}.{suffix}"] = t.clone()
            continue
        p = next((p for p in _BLOCK if rest.startswith(p)), None)
        if p is None:
            raise FormatError(f"{path}: unexpected key {k!r} for a DiT checkpoint")
        out[f"transformer_blocks.{i}.{_BLOCK[p]}{rest[len(p):]}"] = v
    for i in range(depth):
        for src, dst in _SHARED.items():
            for suffix in ("weight", "bias"):
                if src + suffix in sd:
                    out[_EMB.format(i=i) + dst + suffix] = sd[src + suffix].clone()
    return config, out


def from_diffusers(model) -> dict[str, torch.Tensor]:
    """An original-layout DiT state dict (with its pos_embed buffer) from a DiTTransformer2DModel."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    depth = model.config.num_layers
    out: dict[str, torch.Tensor] = {}
    for src, dst in _SHARED.items():
        for suffix in ("weight", "bias"):
            key0 = _EMB.format(i=0) + dst + suffix
            if key0 not in sd:
                continue
            for i in range(1, depth):
                if not torch.equal(sd[_EMB.format(i=i) + dst + suffix], sd[key0]):
                    raise FormatError("the blocks' timestep/label embedders differ; the original DiT layout holds "
                                      "one shared copy, so this model cannot be written as dit-original")
            out[src + suffix] = sd[key0].clone()
    for k, v in sd.items():
        if ".norm1.emb." in k:
            continue
        p = next((p for p in _TOP.values() if k.startswith(p)), None)
        if p is not None:
            orig = next(o for o, d in _TOP.items() if d == p)
            out[orig + k[len(p):]] = v
            continue
        m = re.match(r"transformer_blocks\.(\d+)\.(.*)", k)
        i, rest = m.group(1), m.group(2)
        if rest.startswith("attn1.to_q."):
            suffix = rest[len("attn1.to_q."):]
            qkv = [sd[f"transformer_blocks.{i}.attn1.{n}.{suffix}"] for n in ("to_q", "to_k", "to_v")]
            out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat(qkv, dim=0)
            continue
        if rest.startswith(("attn1.to_k.", "attn1.to_v.")):
            continue
        d = next(d for d in _BLOCK.values() if rest.startswith(d))
        orig = next(o for o, dd in _BLOCK.items() if dd == d)
        out[f"blocks.{i}.{orig}{rest[len(d):]}"] = v
    grid = model.config.sample_size // model.config.patch_size
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    # DiT's own table for this grid (models.py get_2d_sincos_pos_embed(hidden, grid)): diffusers' function with
    # base_size = grid, not its default 16, which is DiT's table only for a 16x16 token grid
    pos = get_2d_sincos_pos_embed(hidden, grid, base_size=grid, interpolation_scale=1.0, output_type="pt")
    out["pos_embed"] = pos.float().unsqueeze(0)
    return out


def config_from_diffusers_state(state: dict[str, torch.Tensor]) -> dict:
    """Infer a DiTTransformer2DModel config from diffusers-layout keys (used for bare .safetensors)."""
    w = state.get("pos_embed.proj.weight")
    if w is None:
        raise FormatError("the file's keys are not a diffusers DiT (no pos_embed.proj.weight); pass --config")
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    if hidden not in HEADS_BY_HIDDEN:
        raise FormatError(f"hidden size {hidden}: the head count is not in the weights; pass --config config.json")
    heads = HEADS_BY_HIDDEN[hidden]
    return {
        "_class_name": "DiTTransformer2DModel", "num_attention_heads": heads, "attention_head_dim": hidden // heads,
        "in_channels": in_ch, "out_channels": state["proj_out_2.weight"].shape[0] // (patch * patch),
        "num_layers": _depth(state, r"transformer_blocks\.(\d+)\."), "patch_size": patch,
        "num_embeds_ada_norm": state["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"].shape[0] - 1,
        "sample_size": 32,
    }
