"""Checkpoints as the model authors' own code writes them, built from tiny diffusers models.

Each writer below names the tensors block by block as the authors' model code does (BFL's flux/model.py and
layers.py, Stability's mmditx.py, PixArt's PixArt.py / PixArtMS.py, facebookresearch/DiT models.py), by hand and
independently of ditkit's key tables (formats/families/*.py), so a test that reads them checks those tables.
The position tables are computed by a numpy copy of the authors' get_2d_sincos_pos_embed.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import diffusers

PREFIX = "model.diffusion_model."


# -- the authors' sin-cos position table (DiT models.py; PixArt adds lewei_scale and base_size) ------------

def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int, lewei_scale: float = 1.0, base_size: int | None = None) -> np.ndarray:
    base_size = base_size or grid_size
    gh = np.arange(grid_size, dtype=np.float32) / (grid_size / base_size) / lewei_scale
    gw = np.arange(grid_size, dtype=np.float32) / (grid_size / base_size) / lewei_scale
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], axis=1)


def _sd(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _mlp(o, sd, dst, src, names=("linear_1", "linear_2"), into=("0", "2"), sep="."):
    for a, b in zip(names, into):
        for wb in ("weight", "bias"):
            o[f"{dst}{sep}{b}.{wb}"] = sd[f"{src}.{a}.{wb}"]


def _wb(o, sd, dst, src):
    for wb in ("weight", "bias"):
        if f"{src}.{wb}" in sd:
            o[f"{dst}.{wb}"] = sd[f"{src}.{wb}"]


def _cat(o, sd, dst, srcs):
    for wb in ("weight", "bias"):
        o[f"{dst}.{wb}"] = torch.cat([sd[f"{s}.{wb}"] for s in srcs], dim=0)


def _shift_scale(t: torch.Tensor) -> torch.Tensor:
    scale, shift = t.chunk(2, dim=0)  # diffusers' AdaLayerNormContinuous: (scale, shift); the authors: (shift, scale)
    return torch.cat([shift, scale], dim=0)


# -- Black Forest Labs Flux.1 (flux/model.py: img_in, time_in, vector_in, guidance_in, txt_in, double_blocks,
#    single_blocks, final_layer) ---------------------------------------------------------------------------

def bfl_flux(tr) -> dict[str, torch.Tensor]:
    sd, o = _sd(tr), {}
    _wb(o, sd, "img_in", "x_embedder")
    _wb(o, sd, "txt_in", "context_embedder")
    _mlp(o, sd, "time_in", "time_text_embed.timestep_embedder", into=("in_layer", "out_layer"))
    _mlp(o, sd, "vector_in", "time_text_embed.text_embedder", into=("in_layer", "out_layer"))
    if tr.config.guidance_embeds:
        _mlp(o, sd, "guidance_in", "time_text_embed.guidance_embedder", into=("in_layer", "out_layer"))
    for i in range(tr.config.num_layers):  # DoubleStreamBlock
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        _wb(o, sd, f"{d}.img_mod.lin", f"{s}.norm1.linear")
        _wb(o, sd, f"{d}.txt_mod.lin", f"{s}.norm1_context.linear")
        _cat(o, sd, f"{d}.img_attn.qkv", [f"{s}.attn.to_{n}" for n in "qkv"])
        _cat(o, sd, f"{d}.txt_attn.qkv", [f"{s}.attn.add_{n}_proj" for n in "qkv"])
        o[f"{d}.img_attn.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
        o[f"{d}.img_attn.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
        o[f"{d}.txt_attn.norm.query_norm.scale"] = sd[f"{s}.attn.norm_added_q.weight"]
        o[f"{d}.txt_attn.norm.key_norm.scale"] = sd[f"{s}.attn.norm_added_k.weight"]
        _wb(o, sd, f"{d}.img_attn.proj", f"{s}.attn.to_out.0")
        _wb(o, sd, f"{d}.txt_attn.proj", f"{s}.attn.to_add_out")
        _wb(o, sd, f"{d}.img_mlp.0", f"{s}.ff.net.0.proj")
        _wb(o, sd, f"{d}.img_mlp.2", f"{s}.ff.net.2")
        _wb(o, sd, f"{d}.txt_mlp.0", f"{s}.ff_context.net.0.proj")
        _wb(o, sd, f"{d}.txt_mlp.2", f"{s}.ff_context.net.2")
    for i in range(tr.config.num_single_layers):  # SingleStreamBlock: linear1 = (q, k, v, mlp_in), linear2
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        _wb(o, sd, f"{d}.modulation.lin", f"{s}.norm.linear")
        _cat(o, sd, f"{d}.linear1", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"])
        o[f"{d}.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
        o[f"{d}.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
        _wb(o, sd, f"{d}.linear2", f"{s}.proj_out")
    _wb(o, sd, "final_layer.linear", "proj_out")
    for wb in ("weight", "bias"):
        o[f"final_layer.adaLN_modulation.1.{wb}"] = _shift_scale(sd[f"norm_out.linear.{wb}"])
    return o


# -- Stability SD3 / SD3.5 (mmditx.py: x_embedder, pos_embed, t_embedder, y_embedder, context_embedder,
#    joint_blocks.N.{x_block,context_block}, final_layer) ----------------------------------------------------

def stability_sd3(tr) -> dict[str, torch.Tensor]:
    sd, o, c = _sd(tr), {}, tr.config
    o["pos_embed"] = sd["pos_embed.pos_embed"]
    _wb(o, sd, "x_embedder.proj", "pos_embed.proj")
    _mlp(o, sd, "t_embedder.mlp", "time_text_embed.timestep_embedder")
    _mlp(o, sd, "y_embedder.mlp", "time_text_embed.text_embedder")
    _wb(o, sd, "context_embedder", "context_embedder")
    last = c.num_layers - 1
    for i in range(c.num_layers):
        s, x, ctx = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        _wb(o, sd, f"{x}.adaLN_modulation.1", f"{s}.norm1.linear")
        _cat(o, sd, f"{x}.attn.qkv", [f"{s}.attn.to_{n}" for n in "qkv"])
        _wb(o, sd, f"{x}.attn.proj", f"{s}.attn.to_out.0")
        _wb(o, sd, f"{x}.mlp.fc1", f"{s}.ff.net.0.proj")
        _wb(o, sd, f"{x}.mlp.fc2", f"{s}.ff.net.2")
        if c.qk_norm:
            o[f"{x}.attn.ln_q.weight"] = sd[f"{s}.attn.norm_q.weight"]
            o[f"{x}.attn.ln_k.weight"] = sd[f"{s}.attn.norm_k.weight"]
            o[f"{ctx}.attn.ln_q.weight"] = sd[f"{s}.attn.norm_added_q.weight"]
            o[f"{ctx}.attn.ln_k.weight"] = sd[f"{s}.attn.norm_added_k.weight"]
        if i in tuple(c.dual_attention_layers or ()):  # SD3.5's x_block.attn2 (DismantledBlock with x_block_self_attn)
            _cat(o, sd, f"{x}.attn2.qkv", [f"{s}.attn2.to_{n}" for n in "qkv"])
            _wb(o, sd, f"{x}.attn2.proj", f"{s}.attn2.to_out.0")
            if c.qk_norm:
                o[f"{x}.attn2.ln_q.weight"] = sd[f"{s}.attn2.norm_q.weight"]
                o[f"{x}.attn2.ln_k.weight"] = sd[f"{s}.attn2.norm_k.weight"]
        _cat(o, sd, f"{ctx}.attn.qkv", [f"{s}.attn.add_{n}_proj" for n in "qkv"])
        if i == last:  # pre_only: the context block ends after its qkv, modulated by (shift, scale)
            for wb in ("weight", "bias"):
                o[f"{ctx}.adaLN_modulation.1.{wb}"] = _shift_scale(sd[f"{s}.norm1_context.linear.{wb}"])
        else:
            _wb(o, sd, f"{ctx}.adaLN_modulation.1", f"{s}.norm1_context.linear")
            _wb(o, sd, f"{ctx}.attn.proj", f"{s}.attn.to_add_out")
            _wb(o, sd, f"{ctx}.mlp.fc1", f"{s}.ff_context.net.0.proj")
            _wb(o, sd, f"{ctx}.mlp.fc2", f"{s}.ff_context.net.2")
    _wb(o, sd, "final_layer.linear", "proj_out")
    for wb in ("weight", "bias"):
        o[f"final_layer.adaLN_modulation.1.{wb}"] = _shift_scale(sd[f"norm_out.linear.{wb}"])
    return o


# -- PixArt-alpha / sigma (PixArt.py, PixArtMS.py: x_embedder, t_embedder, t_block, y_embedder, csize/ar
#    embedders, blocks.N.{attn,cross_attn,mlp,scale_shift_table}, final_layer, pos_embed buffer) ---------------

def pixart(tr, lewei_scale: float = 1.0, null_tokens: int = 120) -> dict[str, torch.Tensor]:
    sd, o, c = _sd(tr), {}, tr.config
    width = c.num_attention_heads * c.attention_head_dim
    grid = c.sample_size // c.patch_size
    o["pos_embed"] = torch.from_numpy(sincos_2d(width, grid, lewei_scale, grid)).float().unsqueeze(0)
    _wb(o, sd, "x_embedder.proj", "pos_embed.proj")
    _mlp(o, sd, "t_embedder.mlp", "adaln_single.emb.timestep_embedder")
    _wb(o, sd, "t_block.1", "adaln_single.linear")
    _mlp(o, sd, "y_embedder.y_proj", "caption_projection", into=("fc1", "fc2"))
    g = torch.Generator().manual_seed(5)
    o["y_embedder.y_embedding"] = torch.randn(null_tokens, c.caption_channels, generator=g) / c.caption_channels ** .5
    if tr.use_additional_conditions:  # PixArtMS micro-conditions
        _mlp(o, sd, "csize_embedder.mlp", "adaln_single.emb.resolution_embedder")
        _mlp(o, sd, "ar_embedder.mlp", "adaln_single.emb.aspect_ratio_embedder")
    for i in range(c.num_layers):
        s, d = f"transformer_blocks.{i}", f"blocks.{i}"
        o[f"{d}.scale_shift_table"] = sd[f"{s}.scale_shift_table"]
        _cat(o, sd, f"{d}.attn.qkv", [f"{s}.attn1.to_{n}" for n in "qkv"])
        _wb(o, sd, f"{d}.attn.proj", f"{s}.attn1.to_out.0")
        _wb(o, sd, f"{d}.cross_attn.q_linear", f"{s}.attn2.to_q")
        _cat(o, sd, f"{d}.cross_attn.kv_linear", [f"{s}.attn2.to_k", f"{s}.attn2.to_v"])
        _wb(o, sd, f"{d}.cross_attn.proj", f"{s}.attn2.to_out.0")
        _wb(o, sd, f"{d}.mlp.fc1", f"{s}.ff.net.0.proj")
        _wb(o, sd, f"{d}.mlp.fc2", f"{s}.ff.net.2")
    _wb(o, sd, "final_layer.linear", "proj_out")
    o["final_layer.scale_shift_table"] = sd["scale_shift_table"]
    return o


# -- facebookresearch/DiT (models.py: x_embedder, t_embedder, y_embedder, pos_embed, blocks, final_layer) ----

def dit(tr) -> dict[str, torch.Tensor]:
    sd, o, c = _sd(tr), {}, tr.config
    width = c.num_attention_heads * c.attention_head_dim
    grid = c.sample_size // c.patch_size
    o["pos_embed"] = torch.from_numpy(sincos_2d(width, grid)).float().unsqueeze(0)
    _wb(o, sd, "x_embedder.proj", "pos_embed.proj")
    _mlp(o, sd, "t_embedder.mlp", "transformer_blocks.0.norm1.emb.timestep_embedder")
    o["y_embedder.embedding_table.weight"] = sd["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"]
    for i in range(c.num_layers):
        s, d = f"transformer_blocks.{i}", f"blocks.{i}"
        _cat(o, sd, f"{d}.attn.qkv", [f"{s}.attn1.to_{n}" for n in "qkv"])
        _wb(o, sd, f"{d}.attn.proj", f"{s}.attn1.to_out.0")
        _wb(o, sd, f"{d}.mlp.fc1", f"{s}.ff.net.0.proj")
        _wb(o, sd, f"{d}.mlp.fc2", f"{s}.ff.net.2")
        _wb(o, sd, f"{d}.adaLN_modulation.1", f"{s}.norm1.linear")
    _wb(o, sd, "final_layer.adaLN_modulation.1", "proj_out_1")
    _wb(o, sd, "final_layer.linear", "proj_out_2")
    return o


def dit_train_checkpoint(model_sd: dict, ema_sd: dict, name: str = "DiT-S/2", image_size: int = 64) -> dict:
    """What DiT's train.py saves: {"model", "ema", "opt", "args"} with args an argparse.Namespace."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1e-4)
    p.grad = torch.ones(3)
    opt.step()
    args = argparse.Namespace(model=name, image_size=image_size, num_classes=1000, global_batch_size=256,
                              epochs=1400, vae="ema", results_dir="results", global_seed=0, num_workers=4,
                              log_every=100, ckpt_every=50000, data_path="/data/imagenet/train")
    return {"model": model_sd, "ema": ema_sd, "opt": opt.state_dict(), "args": args}


# -- tiny diffusers models ------------------------------------------------------------------------------

def flux_model(head_dim: int = 128, guidance: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    axes = (16, 56, 56) if head_dim == 128 else (4, 6, 6)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=head_dim,
        num_attention_heads=1 if head_dim == 128 else 2, joint_attention_dim=24, pooled_projection_dim=16,
        guidance_embeds=guidance, axes_dims_rope=axes).eval()


def sd3_model(sd35: bool = False, head_dim: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    extra = dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {}
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=head_dim,
        num_attention_heads=2 if head_dim != 64 else 1, joint_attention_dim=24, caption_projection_dim=head_dim *
        (2 if head_dim != 64 else 1), pooled_projection_dim=16, pos_embed_max_size=16, **extra).eval()


def pixart_model(ms: bool = False, heads: int = 2, head_dim: int = 72, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, cross_attention_dim=heads * head_dim, caption_channels=24,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=ms,
        interpolation_scale=1).eval()


def dit_model(heads: int = 6, head_dim: int = 64, seed: int = 0, classes: int = 1000):
    torch.manual_seed(seed)
    tr = diffusers.DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                         out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                         num_embeds_ada_norm=classes).eval()
    first = tr.transformer_blocks[0].norm1.emb.state_dict()  # the authors' DiT shares one embedder: tie them
    for blk in tr.transformer_blocks[1:]:
        blk.norm1.emb.load_state_dict(first)
    return tr


# -- the authors' DiT forward (facebookresearch/DiT models.py, written out): what a converted DiT must reproduce ----

def _timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-np.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def dit_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, heads: int) -> torch.Tensor:
    """DiT.forward(x, t, y) of the authors' models.py on their state dict `sd` (learn_sigma: 2C output channels)."""
    import torch.nn.functional as nnf

    def lin(h, name):
        return nnf.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def modulate(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    w = sd["x_embedder.proj.weight"]
    d, p = w.shape[0], w.shape[2]
    n, _, hh, ww = x.shape
    h = nnf.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]  # (N, T, D)
    c = lin(nnf.silu(lin(_timestep_embedding(t), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}"
        sh1, sc1, g1, sh2, sc2, g2 = lin(nnf.silu(c), f"{b}.adaLN_modulation.1").chunk(6, dim=1)
        a = modulate(nnf.layer_norm(h, (d,), eps=1e-6), sh1, sc1)
        qkv = lin(a, f"{b}.attn.qkv").reshape(n, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        h = h + g1.unsqueeze(1) * lin((att @ v).transpose(1, 2).reshape(n, -1, d), f"{b}.attn.proj")
        m = modulate(nnf.layer_norm(h, (d,), eps=1e-6), sh2, sc2)
        h = h + g2.unsqueeze(1) * lin(nnf.gelu(lin(m, f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
    shift, scale = lin(nnf.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(modulate(nnf.layer_norm(h, (d,), eps=1e-6), shift, scale), "final_layer.linear")  # (N, T, p*p*C)
    cout = h.shape[-1] // (p * p)
    h = h.reshape(n, hh // p, ww // p, p, p, cout)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(n, cout, hh, ww)
