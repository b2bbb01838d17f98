"""A config against its weights, before anything is built: refuse what does not match or does not fit.

A config.json is untrusted: `num_layers: 65536` beside 2 blocks of weights would build 65536 blocks for minutes,
a width of 65536 would allocate gigabytes, and integer tensors where the model has float parameters would load
into garbage. Every loader calls one function here with the config and the weights' (dtype, shape) table, which
it has from the safetensors headers (formats/safetensors_check.py) without reading a tensor:

1. block counts: `num_layers` / `num_single_layers` must equal the blocks the weights hold;
2. size: the positional table the model computes at build time must fit (sample_size / patch_size);
3. shapes and dtypes: the model is built on the meta device (no memory, bounded by 1.) and every weight it
   shares with the file must have the file's shape, and be a float tensor where the model's is float.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from .errors import FormatError

MAX_POSITION_TABLE = 1 << 27  # elements of a sincos position table (DiT-XL/2 at 512 px: 4.7M; SD3's 192**2 grid: 57M)
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ", "F8_E8M0"}


def weights_table(files: list[Path]) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) over safetensors files, from their headers alone."""
    from .safetensors_check import read_header

    table = {}
    for p in files:
        for name, info in read_header(p).items():
            if name != "__metadata__":
                table[name] = (info["dtype"], info["shape"])
    return table


def state_table(state: dict) -> dict[str, tuple[str, list[int]]]:
    """The same table for a state dict already in memory (a single file, a DiT .pt)."""
    names = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}
    return {k: (names.get(str(v.dtype).removeprefix("torch."), str(v.dtype)), list(v.shape)) for k, v in state.items()}


def blocks_in(table: dict, prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    idx = [int(m.group(1)) for k in table if (m := pat.match(k))]
    return max(idx) + 1 if idx else 0


def check_counts(fam, config: dict, table: dict, where) -> None:
    """Block counts in the config equal the blocks the weights hold (1. above): each of the family's block lists
    (`Family.stacks`: config field -> ModuleList)."""
    for field, prefix in ((s.config_key, s.attr) for s in fam.stacks):
        n = config.get(field)
        if n is None:
            continue
        have = blocks_in(table, prefix)
        if n != have:
            raise FormatError(f"{where}: the config says {field}={n} but the weights hold {have} {prefix}; "
                              "restore the config that was saved with these weights")


def check_fits(config: dict, where) -> None:
    """The position table a model computes at build time stays bounded (2. above)."""
    side, patch = config.get("pos_embed_max_size") or config.get("sample_size"), config.get("patch_size") or 1
    width = (config.get("num_attention_heads") or 1) * (config.get("attention_head_dim") or 1)
    if isinstance(side, int) and isinstance(patch, int) and isinstance(width, int):
        n = (side // max(patch, 1)) ** 2 * width
        if n > MAX_POSITION_TABLE:
            raise FormatError(f"{where}: sample_size {side} / patch_size {patch} at width {width} needs a "
                              f"{n:.3g}-entry position table, more than any DiT uses; restore the config")


def check_against_weights(fam, config: dict, table: dict, where) -> None:
    """1.-3. above for the family `fam`'s model class built from `config`, and the weights' table."""
    import torch

    check_counts(fam, config, table, where)
    check_fits(config, where)
    cls = fam.transformer_cls()
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as e:  # diffusers raises many types for configs it cannot build
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{where}: the config does not build a {cls.__name__} ({msg[:160]}); restore the config")
    wrong_shape, wrong_dtype = [], []
    for name, t in model.state_dict().items():
        if name not in table:
            continue
        dtype, shape = table[name]
        if list(t.shape) != list(shape):
            wrong_shape.append(f"{name} {list(shape)} (config: {list(t.shape)})")
        elif t.is_floating_point() and dtype not in FLOAT_DTYPES:
            wrong_dtype.append(f"{name} ({dtype})")
    if wrong_shape:
        raise FormatError(f"{where}: {len(wrong_shape)} weights do not fit the config, e.g. {wrong_shape[0]}; "
                          "restore the config that was saved with these weights")
    if wrong_dtype:
        raise FormatError(f"{where}: {len(wrong_dtype)} weights are not floating point where the model's are, e.g. "
                          f"{wrong_dtype[0]}; re-save them as float tensors")


def check_weights_dir(fam, config: dict, root: Path, quantized: bool = False) -> None:
    """The checks for a transformer directory (config.json + *.safetensors); a quantized one (its own tensor
    names and integer dtypes by design) gets the count and size checks only."""
    root = Path(root)
    table = weights_table(sorted(root.glob("*.safetensors")))
    where = root / "config.json"
    if quantized:
        check_counts(fam, config, table, where)
        check_fits(config, where)
    else:
        check_against_weights(fam, config, table, where)


