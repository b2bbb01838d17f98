"""Checkpoints in the model authors' own key layouts: told apart by their keys, read into diffusers models, written back.

| layout            | family | marker keys (after an optional `model.diffusion_model.` prefix) | mapping |
|-------------------|--------|------------------------------------------------------------------|---------|
| `bfl-flux`        | flux   | `double_blocks.0.img_attn.qkv.weight`                            | original_keys, flux.FLUX |
| `stability-sd3`   | sd3    | `joint_blocks.0.x_block.attn.qkv.weight`                         | original_keys, sd3.SD3 |
| `pixart-original` | pixart | `t_block.1.weight`, `blocks.0.cross_attn.q_linear.weight`        | original_keys, pixart.PIXART |
| `dit-original`    | dit    | `y_embedder.embedding_table.weight`, `blocks.0.adaLN_modulation.1.weight` | dit_original |

Each reader builds the diffusers config from the tensors' shapes (width, depth, channels, patch, qk-norm, guidance
embedding, dual attention, size embedders); where the shapes do not decide a field (the head count of an
unpublished width, Flux's rotary axes at a head size other than 128) it raises a ConfigError naming the layout and
the field, and a `--config` supplies it. The key tables split fused tensors by the shapes of the model the config
builds (on the meta device), so they hold at any width; diffusers' Flux converter hard-codes width 3072.

    identify(keys) -> AuthorsLayout | None      (which layout a set of keys is in)
    read(state, where, config=None, hints=None) -> (layout, config, diffusers state dict)
    write(name, model) -> state dict in that layout's keys (no prefix)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from . import dit_original, original_keys
from .errors import ConfigError, FormatError
from .families import get_family
from .families import pixart as pixart_family

PREFIX = original_keys.PREFIX
FLUX_ROPE = {128: (16, 56, 56)}  # head dim -> axes_dims_rope of the published Flux.1 models
PIXART_HEAD_DIM = 72  # PixArt-XL-2 (alpha and sigma): 16 heads of 72 at width 1152; not in the weights
SD3_HEAD_DIM = 64  # the authors' MMDiT: hidden = 64 * depth, heads = depth (SD3-medium, SD3.5-large/medium)
PIXART_SCALES = (0.5, 1.0, 2.0, 4.0)  # pe_interpolation of the released PixArt-alpha/sigma models
DIT_HEADS_BY_NAME = {"S": 6, "B": 12, "L": 16, "XL": 16}  # facebookresearch/DiT models.py DiT_models


@dataclass(frozen=True)
class AuthorsLayout:
    name: str
    family: str
    markers: tuple[str, ...]  # keys (prefix removed) that together identify the layout
    doc: str
    # (state, where, config or None, hints) -> (config, diffusers state dict)
    read: Callable[[dict, str, dict | None, dict], tuple[dict, dict]]
    write: Callable[[torch.nn.Module], dict]  # model -> the layout's state dict
    conventions: dict | None = None  # what the authors' model does that the diffusers config does not say (Family.conventions)
    file_prefix: str = ""  # the prefix of the files the authors ship (Stability: model.diffusion_model.)
    infer: Callable[[dict, str], dict] | None = None  # (state, where) -> the config its shapes decide


def strip_prefix(state: dict) -> dict:
    """The diffusion model's own tensors: a `model.diffusion_model.` prefix (ComfyUI / Stability files, which may
    also hold a VAE and text encoders under other prefixes) is removed and the other components left out."""
    if any(k.startswith(PREFIX) for k in state):
        return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    return state


def identify(keys) -> AuthorsLayout | None:
    keys = set(strip_prefix(dict.fromkeys(keys)))
    return next((lay for lay in AUTHORS_LAYOUTS.values() if all(m in keys for m in lay.markers)), None)


def config_from_shapes(state: dict, where: str) -> dict | None:
    """The diffusers config that the shapes of a state dict in an authors' layout decide (any object with `.shape`
    per key: tensors, a GGUF file's arrays); a ConfigError names the field they leave open; None when the keys
    are in no authors' layout, or in one without a shape reader."""
    state = strip_prefix(state)
    lay = identify(state)
    return None if lay is None or lay.infer is None else lay.infer(state, where)


def read(state: dict, where: str, config: dict | None = None, hints: dict | None = None):
    """(layout, diffusers config, diffusers state dict) of a state dict in an authors' layout."""
    state = strip_prefix(state)
    lay = identify(state)
    if lay is None:
        raise FormatError(f"{where}: the keys are in none of the authors' layouts ({', '.join(AUTHORS_LAYOUTS)})")
    conf, converted = lay.read(state, where, config, hints or {})
    return lay, conf, converted


def write(name: str, model: torch.nn.Module) -> dict:
    return AUTHORS_LAYOUTS[name].write(model)


# -- files ditkit writes in an authors' layout (export --format bfl-flux | stability-sd3 | pixart-original) ----
# The header metadata carries the exact diffusers config ("ditkit_config", not "config": that key marks ditkit's
# own diffusers-keyed single file) and the manifest ("ditkit"); the authors' readers ignore both.

def file_state(name: str, model: torch.nn.Module) -> dict:
    lay = AUTHORS_LAYOUTS[name]
    return {lay.file_prefix + k: v.contiguous() for k, v in write(name, model).items()}


def file_metadata(bundle, manifest: dict) -> dict:
    import json

    config = json.loads(bundle.transformer.to_json_string())
    return {"format": "pt", "ditkit_config": json.dumps(config, sort_keys=True), "family": bundle.family.name,
            "ditkit": json.dumps(manifest, sort_keys=True, default=str)}


# -- shapes ------------------------------------------------------------------------------------

def _shape(state: dict, key: str, layout: str, what: str, where: str) -> tuple[int, ...]:
    if key not in state:
        raise FormatError(f"{where}: a {layout} checkpoint without {key} (its {what}); the file is incomplete "
                          "or not in that layout")
    return tuple(state[key].shape)


def _count(state: dict, prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    idx = [int(m.group(1)) for k in state if (m := pat.match(k))]
    return max(idx) + 1 if idx else 0


def _meta_shapes(family: str, config: dict, where: str) -> dict[str, tuple]:
    from .safetensors_check import check_config

    cls = get_family(family).transformer_cls()
    try:
        with torch.device("meta"):
            model = cls.from_config(check_config(config, where))
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{where}: the config does not build a {cls.__name__} ({str(e)[:200]}); fix --config")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _table_read(family: str, layout: tuple | None, infer: Callable[[dict, str], dict], extras=()):
    def read_(state, where, config, hints):
        state = {k: v for k, v in state.items() if k not in extras}
        conf = config if config is not None else infer(state, where)
        try:
            converted = original_keys.from_original(family, state, _meta_shapes(family, conf, where), layout=layout)
        except FormatError as e:
            fix = "pass the right --config" if config is not None else "the file is incomplete or of another model"
            raise FormatError(f"{where}: {e}; {fix}") from None
        return conf, converted
    return read_


def _flux_config(st: dict, where: str) -> dict:
    lay = "bfl-flux"
    width, cin = _shape(st, "img_in.weight", lay, "image projection", where)
    qn = next((k for k in ("double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.norm.query_norm.scale")
               if k in st), "double_blocks.0.img_attn.norm.query_norm.scale")  # a depth-pruned file may keep one kind
    hd = _shape(st, qn, lay, "head size", where)[0]
    if hd not in FLUX_ROPE:
        raise ConfigError(f"{where}: a {lay} checkpoint with head size {hd}: its rotary axes (axes_dims_rope) are "
                          f"not in the weights (Flux.1: {FLUX_ROPE[128]} at 128); pass --config config.json")
    out = _shape(st, "final_layer.linear.weight", lay, "output projection", where)[0]
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": cin,
            "out_channels": None if out == cin else out,
            "num_layers": _count(st, "double_blocks"), "num_single_layers": _count(st, "single_blocks"),
            "attention_head_dim": hd, "num_attention_heads": width // hd,
            "joint_attention_dim": _shape(st, "txt_in.weight", lay, "text projection", where)[1],
            "pooled_projection_dim": _shape(st, "vector_in.in_layer.weight", lay, "pooled projection", where)[1],
            "guidance_embeds": "guidance_in.in_layer.weight" in st, "axes_dims_rope": list(FLUX_ROPE[hd])}


def _sd3_config(st: dict, where: str) -> dict:
    lay = "stability-sd3"
    width, cin, patch, _ = _shape(st, "x_embedder.proj.weight", lay, "patch embedding", where)
    side = math.isqrt(_shape(st, "pos_embed", lay, "position table", where)[1])
    depth = _count(st, "joint_blocks")
    qk = "joint_blocks.0.x_block.attn.ln_q.weight" in st
    hd = st["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0] if qk else SD3_HEAD_DIM
    if width % hd:
        raise ConfigError(f"{where}: a {lay} checkpoint of width {width} without qk-norm: its head count is not in "
                          f"the weights (the authors' models use head size {SD3_HEAD_DIM}); pass --config config.json")
    ctx_out, ctx_in = _shape(st, "context_embedder.weight", lay, "context projection", where)
    out = _shape(st, "final_layer.linear.weight", lay, "output projection", where)[0] // (patch * patch)
    dual = tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in st)
    return {"_class_name": "SD3Transformer2DModel", "sample_size": min(128, side), "patch_size": patch,
            "in_channels": cin, "out_channels": out, "num_layers": depth, "attention_head_dim": hd,
            "num_attention_heads": width // hd, "joint_attention_dim": ctx_in, "caption_projection_dim": ctx_out,
            "pooled_projection_dim": _shape(st, "y_embedder.mlp.0.weight", lay, "pooled projection", where)[1],
            "pos_embed_max_size": side, "qk_norm": "rms_norm" if qk else None, "dual_attention_layers": dual}


def _pixart_config(st: dict, where: str) -> dict:
    lay = "pixart-original"
    width, cin, patch, _ = _shape(st, "x_embedder.proj.weight", lay, "patch embedding", where)
    if width % PIXART_HEAD_DIM:
        raise ConfigError(f"{where}: a {lay} checkpoint of width {width}: its head count is not in the weights "
                          f"(PixArt-XL-2 uses head size {PIXART_HEAD_DIM}); pass --config config.json")
    heads = width // PIXART_HEAD_DIM
    sizes = "csize_embedder.mlp.0.weight" in st  # PixArtMS with micro-conditions (PixArt-alpha 1024)
    conf = {"_class_name": "PixArtTransformer2DModel", "num_attention_heads": heads,
            "attention_head_dim": PIXART_HEAD_DIM, "in_channels": cin,
            "out_channels": _shape(st, "final_layer.linear.weight", lay, "output projection", where)[0] // patch ** 2,
            "num_layers": _count(st, "blocks"), "patch_size": patch, "sample_size": 128 if sizes else 64,
            "cross_attention_dim": width, "norm_type": "ada_norm_single", "num_embeds_ada_norm": 1000,
            "caption_channels": _shape(st, "y_embedder.y_proj.fc1.weight", lay, "caption projection", where)[1],
            "use_additional_conditions": sizes, "interpolation_scale": None}
    return conf


def _pixart_pos(st: dict, conf: dict, where: str) -> dict:
    """The native size and pe_interpolation from the file's position buffer (when it holds one)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    pos = st.get("pos_embed")
    if pos is None:
        return conf
    grid = math.isqrt(pos.shape[1])
    conf = {**conf, "sample_size": grid * conf["patch_size"]}
    width = conf["num_attention_heads"] * conf["attention_head_dim"]
    for s in PIXART_SCALES:
        table = get_2d_sincos_pos_embed(width, grid, base_size=grid, interpolation_scale=s, output_type="pt")
        if table.shape == pos.shape[1:] and torch.allclose(table.float(), pos[0].float(), atol=1e-3):
            return {**conf, "interpolation_scale": s}
    raise FormatError(f"{where}: the pixart-original position table matches no pe_interpolation of "
                      f"{PIXART_SCALES}; pass --config config.json with interpolation_scale")


def _pixart_read(state, where, config, hints):
    extras = ("pos_embed", "y_embedder.y_embedding")
    base = _table_read("pixart", pixart_family.AUTHORS_LAYOUT, lambda st, w: _pixart_pos(state, _pixart_config(st, w), w),
                       extras)
    return base(state, where, config, hints)


def _pixart_write(model) -> dict:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out = original_keys.to_original("pixart", state, layout=pixart_family.AUTHORS_LAYOUT)
    out["pos_embed"] = model.pos_embed.pos_embed.detach().cpu().float().contiguous()  # (1, N, D), as PixArt.py
    return out


def _dit_read(state, where, config, hints):
    heads = (config or {}).get("num_attention_heads") or hints.get("heads")
    conf, converted = dit_original.to_diffusers(state, where, heads=heads)
    if config is not None:
        conf = {**conf, **{k: v for k, v in config.items() if not k.startswith("_")}}
    return conf, converted


def _original_write(family: str):
    def write_(model):
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        return original_keys.to_original(family, state)
    return write_


AUTHORS_LAYOUTS: dict[str, AuthorsLayout] = {lay.name: lay for lay in (
    AuthorsLayout("bfl-flux", "flux", ("double_blocks.0.img_attn.qkv.weight",),
                  "Black Forest Labs' Flux.1 keys (flux1-dev.safetensors)",
                  _table_read("flux", None, _flux_config), _original_write("flux"), infer=_flux_config),
    AuthorsLayout("stability-sd3", "sd3", ("joint_blocks.0.x_block.attn.qkv.weight",),
                  "Stability's MMDiT keys (sd3_medium.safetensors, SD3.5)",
                  _table_read("sd3", None, _sd3_config), _original_write("sd3"), None, PREFIX, infer=_sd3_config),
    AuthorsLayout("pixart-original", "pixart", ("t_block.1.weight", "blocks.0.cross_attn.q_linear.weight"),
                  "PixArt-alpha/sigma keys (PixArt-XL-2-*.pth, PixArt.py / PixArtMS.py)", _pixart_read, _pixart_write),
    AuthorsLayout("dit-original", "dit", ("y_embedder.embedding_table.weight", "blocks.0.adaLN_modulation.1.weight"),
                  "facebookresearch/DiT keys (DiT-XL-2-256x256.pt, train.py checkpoints)", _dit_read,
                  lambda model: dit_original.from_diffusers(model), {"timestep_shift": 0}),
)}


# -- torch pickles (.pt / .pth) ----------------------------------------------------------------

# entries of a training checkpoint, in the order the authors' samplers read them: DiT's sample.py takes
# "ema"; PixArt's inference scripts take "state_dict" (its training files also hold "state_dict_ema")
ENTRIES = ("ema", "state_dict", "model", "state_dict_ema", "module")


def unwrap(obj, where: str) -> tuple[dict, dict]:
    """(state dict, hints) from a loaded .pt/.pth: a state dict, or a training checkpoint holding one; hints
    from a DiT train.py checkpoint's `args` (argparse.Namespace): the head count of its model name."""
    hints: dict = {}
    if isinstance(obj, dict):
        args = obj.get("args")
        name = getattr(args, "model", None)
        m = re.match(r"DiT-(S|B|L|XL)/\d+$", name) if isinstance(name, str) else None
        if m:
            hints["heads"] = DIT_HEADS_BY_NAME[m.group(1)]
        entry = next((e for e in ENTRIES if isinstance(obj.get(e), dict)), None)
        if entry is not None and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = obj[entry]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FormatError(f"{where} is not a state dict (expected a dict of tensors, or a training checkpoint with "
                          f"one under {', '.join(repr(e) for e in ENTRIES)})")
    return obj, hints


def torch_load(path) -> object:
    """torch.load with weights_only=True, allowing argparse.Namespace (DiT train.py's `args`) and nothing else."""
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)
