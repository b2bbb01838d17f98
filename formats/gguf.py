"""GGUF files (the llama.cpp / city96 ComfyUI-GGUF format) in and out, with the `gguf` package.

Writing (encode + save_gguf): the transformer's state dict in the key layout each family's GGUF readers expect:
  flux  Black Forest Labs' keys (`double_blocks.0.img_attn.qkv.weight`), general.architecture "flux"
  sd3   Stability's keys (`joint_blocks.0.x_block.attn.qkv.weight`), general.architecture "sd3"
        (both as ComfyUI-GGUF and diffusers' `from_single_file(..., quantization_config=GGUFQuantizationConfig())`
        read them; formats/original_keys.py holds the mapping)
  dit, pixart  diffusers' own keys, general.architecture "dit" / "pixart": no GGUF reader exists for either
        (ComfyUI-GGUF's convert script knows neither), so the honest layout is the one ditkit and diffusers load.
Tensors stay float where city96's tools/convert.py (and its llama.cpp patch) keeps them: 1-D tensors (norms,
biases) and tensors of <= 1024 elements in F32; the input/output embedders and the final layer in F32; a
tensor whose rows do not divide into the quant type's blocks (32, or 256 for K-quants) in F16.
Q8_0, Q4_0 and BF16 come from `gguf.quants.quantize`. The gguf package has no K-quant encoder (its Q4_K/Q5_K
decode only), so Q4_K and Q5_K are encoded here by a numpy port of ggml's reference encoders
(quantize_row_q4_K_ref / quantize_row_q5_K_ref with make_qkx2_quants); the test checks them with gguf's and
diffusers' decoders.
Metadata: general.architecture, general.quantization_version, general.file_type, and ditkit's own
ditkit.family, ditkit.layout, ditkit.config (the diffusers config.json, JSON) and ditkit.manifest (JSON).

Reading (read_gguf -> (family, config, state), formats/layouts/gguf.py -> Bundle): tensors dequantized to float
with `gguf.quants.dequantize`, mapped back to diffusers keys, the model built from --config, else ditkit.config, else
the tensor shapes where they decide the architecture (formats/authors.config_from_shapes for Flux and SD3 in the
authors' keys, the family's config_from_state for diffusers keys).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import original_keys
from .errors import ConfigError, FormatError

QUANTS = ("Q8_0", "Q5_K", "Q4_K", "Q4_0", "BF16")  # what `export --format gguf --quant` writes
SMALL = 1024  # city96's QUANTIZATION_THRESHOLD: tensors this small stay F32


def _gguf():
    try:
        import gguf
    except ImportError as e:  # a dependency, but say what to do if an install lacks it
        raise FormatError("reading or writing .gguf needs the gguf package; pip install 'gguf>=0.10'") from e
    return gguf


def _keep_float(family: str) -> tuple[str, ...]:
    from .families import get_family

    return get_family(family).gguf_keep_float  # the family adapter says (formats/families/)


def layout(family: str) -> str:
    return original_keys.layout_name(family)


# -- K-quant encoders (numpy ports of ggml's reference rows; QK_K = 256 values per super-block) -------

def _make_qkx2(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml make_qkx2_quants over sub-blocks x (S, 32): (scale, -min) per sub-block, the weighted
    least-squares fit of x ~ scale * L + min searched over nstep + 1 grid offsets."""
    w = np.sqrt((x * x).mean(axis=1, keepdims=True)) + np.abs(x)  # ggml's weights: av_x + |x|
    mn = np.minimum(x.min(axis=1, keepdims=True), 0.0)
    mx = x.max(axis=1, keepdims=True)
    rng = mx - mn
    flat = rng[:, 0] == 0
    safe = np.where(rng == 0, 1.0, rng)
    sum_w, sum_x = w.sum(1, keepdims=True), (w * x).sum(1, keepdims=True)
    iscale = nmax / safe
    scale, best_min = 1 / iscale, mn.copy()
    L = np.clip(np.rint(iscale * (x - mn)), 0, nmax)
    best = (w * (scale * L + mn - x) ** 2).sum(1, keepdims=True)
    for i in range(nstep + 1):
        Lq = np.clip(np.rint((rmin + rdelta * i + nmax) / safe * (x - mn)), 0, nmax)
        sl, sl2, sxl = (w * Lq).sum(1, keepdims=True), (w * Lq * Lq).sum(1, keepdims=True), (w * Lq * x).sum(1, keepdims=True)
        D = sum_w * sl2 - sl * sl
        ok = D > 0
        Ds = np.where(ok, D, 1.0)
        s = (sum_w * sxl - sum_x * sl) / Ds
        m = (sl2 * sum_x - sl * sxl) / Ds
        pos = m > 0
        s = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1.0), s)
        m = np.where(pos, 0.0, m)
        err = (w * (s * Lq + m - x) ** 2).sum(1, keepdims=True)
        better = ok & (err < best)
        best, scale, best_min = np.where(better, err, best), np.where(better, s, scale), np.where(better, m, best_min)
    scale, best_min = scale[:, 0], best_min[:, 0]
    scale[flat], best_min[flat] = 0.0, mn[flat, 0]
    return scale, -best_min


def _k_quant(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared by Q4_K / Q5_K: (d, dmin as f16 bytes, 12 packed scale bytes, levels L (n, 256))."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    scales, mins = _make_qkx2(sub, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = scales.max(1, keepdims=True), mins.max(1, keepdims=True)
    inv_s = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1), 0.0)
    inv_m = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1), 0.0)
    ls = np.minimum(63, np.rint(inv_s * scales)).astype(np.uint8)
    lm = np.minimum(63, np.rint(inv_m * mins)).astype(np.uint8)
    packed = np.zeros((n, 12), dtype=np.uint8)  # ggml's 6-bit scale/min packing (get_scale_min_k4)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    d = (max_scale / 63.0).astype(np.float16)
    dmin = (max_min / 63.0).astype(np.float16)
    dd = d.astype(np.float32) * ls  # (n, 8) the scales as a decoder reads them
    dm = dmin.astype(np.float32) * lm
    safe = np.where(dd == 0, 1.0, dd)
    L = np.rint((sub.reshape(n, 8, 32) + dm[..., None]) / safe[..., None])
    L = np.where(dd[..., None] == 0, 0, np.clip(L, 0, nmax)).astype(np.uint8).reshape(n, 256)
    return d.view(np.uint8), dmin.view(np.uint8), packed, L


def _q4_k(rows: np.ndarray) -> np.ndarray:
    d, dmin, sc, L = _k_quant(rows.reshape(-1, 256), 15, -1.0, 0.1, 20)
    L = L.reshape(-1, 4, 2, 32)  # per 64 values: low nibble = first 32, high nibble = next 32
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d, dmin, sc, qs], axis=1)


def _q5_k(rows: np.ndarray) -> np.ndarray:
    d, dmin, sc, L = _k_quant(rows.reshape(-1, 256), 31, -0.5, 0.1, 15)
    hi = (L >> 4).reshape(-1, 8, 32)  # bit b of qh[j] is the fifth bit of value 32 * b + j
    qh = np.zeros((L.shape[0], 32), dtype=np.uint8)
    for b in range(8):
        qh |= (hi[:, b] << b).astype(np.uint8)
    lo = (L & 0xF).reshape(-1, 4, 2, 32)
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d, dmin, sc, qh, qs], axis=1)


def quantize(data: np.ndarray, qtype_name: str) -> np.ndarray:
    """float32 (..., cols) -> the GGUF bytes of `qtype_name`, shaped (..., bytes per row)."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[qtype_name]
    if qtype_name in ("Q4_K", "Q5_K"):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = data.reshape(-1, data.shape[-1]).astype(np.float32)
        out = (_q4_k if qtype_name == "Q4_K" else _q5_k)(rows)
        return out.reshape(*data.shape[:-1], data.shape[-1] // block * size)
    return gguf.quants.quantize(data, qtype)


# -- writing -------------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """The tensors as they go into the file: name -> (GGML type name, array), plus the metadata strings."""
    family: str
    quant: str
    tensors: dict[str, tuple[str, np.ndarray]]
    config: dict

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t, _ in self.tensors.values():
            out[t] = out.get(t, 0) + 1
        return out


def tensor_type(family: str, key: str, shape: tuple, quant: str) -> str:
    """The GGML type a tensor is written in (city96's rules: see the module docstring)."""
    n = int(np.prod(shape))
    if len(shape) == 1 or n <= SMALL or len(shape) > 2 or any(key.startswith(p) for p in _keep_float(family)):
        return "F32"
    if quant == "BF16":
        return "BF16"
    block = 256 if quant.endswith("_K") else 32
    return quant if shape[-1] % block == 0 else "F16"


def encode(transformer, family: str, quant: str) -> Encoded:
    if quant not in QUANTS:
        from .errors import choice_error

        raise choice_error("--quant", quant, QUANTS)
    state = {k: v.detach().float().cpu().contiguous() for k, v in transformer.state_dict().items()}
    if original_keys.has_original_layout(family):
        state = original_keys.to_original(family, state)
    tensors = {}
    for key, t in state.items():
        arr = t.numpy()
        qt = tensor_type(family, key, arr.shape, quant)
        tensors[key] = (qt, arr.astype(np.float32 if qt == "F32" else np.float16) if qt in ("F32", "F16")
                        else quantize(arr, qt))
    return Encoded(family, quant, tensors, json.loads(transformer.to_json_string()))


def decode(enc: Encoded) -> dict[str, torch.Tensor]:
    """What a reader gets back: the dequantized float tensors, in the file's key layout."""
    gguf = _gguf()
    out = {}
    for key, (qt, arr) in enc.tensors.items():
        out[key] = torch.from_numpy(gguf.quants.dequantize(arr, gguf.GGMLQuantizationType[qt]).astype(np.float32))
    return out


def save_gguf(enc: Encoded, path: os.PathLike, manifest: dict) -> None:
    gguf = _gguf()
    writer = gguf.GGUFWriter(str(path), arch=enc.family)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    file_type = {"BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_K": "MOSTLY_Q4_K_M",
                 "Q5_K": "MOSTLY_Q5_K_M"}[enc.quant]
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_string("ditkit.family", enc.family)
    writer.add_string("ditkit.layout", layout(enc.family))
    writer.add_string("ditkit.quant", enc.quant)
    writer.add_string("ditkit.config", json.dumps(enc.config, sort_keys=True))
    writer.add_string("ditkit.manifest", json.dumps(manifest, sort_keys=True, default=str))
    for key, (qt, arr) in enc.tensors.items():
        writer.add_tensor(key, arr, raw_dtype=gguf.GGMLQuantizationType[qt])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def save_gguf_file(bundle, out: os.PathLike, manifest: dict, force: bool = False) -> Path:
    """export's writer: encodes the bundle's transformer with the manifest's --quant and writes it atomically."""
    from .atomic import atomic_file

    quant = manifest.get("config", {}).get("quant") or "Q8_0"
    enc = encode(bundle.transformer, bundle.family.name, quant)
    out = Path(out)
    with atomic_file(out, force=force) as tmp:
        save_gguf(enc, tmp, manifest)
    return out


# -- reading -------------------------------------------------------------------------------------------

def _field(reader, name: str):
    f = reader.get_field(name)
    return None if f is None else f.contents()


def read_gguf(path: os.PathLike, family: str | None = None, config: dict | None = None):
    """(family name, diffusers config, diffusers-key state of float32 tensors, metadata dict)."""
    gguf = _gguf()
    from .families import FAMILIES, get_family

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
        meta = {k: _field(reader, k) for k in ("general.architecture", "ditkit.family", "ditkit.layout",
                                               "ditkit.config", "ditkit.manifest", "ditkit.quant")}
        raw = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            raw[t.name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(shape))
    except (ValueError, KeyError, IndexError, OSError, NotImplementedError, TypeError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise FormatError(f"{path} is not a readable GGUF file ({msg}); check that it is complete, uncorrupted "
                          "and was written by the gguf package") from e
    fam = family or meta["ditkit.family"] or meta["general.architecture"]
    if fam not in FAMILIES:
        raise ConfigError(f"{path}: GGUF architecture {meta['general.architecture']!r} is not a ditkit family; "
                          f"pass --family ({', '.join(FAMILIES)})")
    fam = get_family(fam).name
    meta["config_from"] = "--config" if config is not None else None
    if config is None and meta["ditkit.config"]:
        meta["config_from"] = "ditkit.config"
        try:
            config = json.loads(meta["ditkit.config"])
        except json.JSONDecodeError:
            raise FormatError(f"{path}: its ditkit.config metadata is not JSON; pass --config")
    orig = original_keys.has_original_layout(fam) and not any(k.startswith("transformer_blocks.") for k in raw)
    if config is None:  # a GGUF another tool wrote: the architecture from the tensor shapes, where they decide it
        family_ = get_family(fam)
        if orig:
            from .authors import config_from_shapes

            config = config_from_shapes(raw, str(path))
        else:
            config = family_.config_from_state(raw)
        meta["config_from"] = "tensor shapes" if config is not None else None
    if config is None:
        raise ConfigError(f"{path}: this GGUF carries no ditkit config, and its tensor shapes do not decide the {fam} "
                          "architecture (the head split of the width); pass --config config.json")
    state = raw
    if orig:
        state = original_keys.from_original(fam, raw, _shapes(fam, config, path))
    return fam, config, state, meta


def _shapes(fam_name: str, config: dict, where: Path) -> dict[str, tuple]:
    from .families import get_family

    cls = get_family(fam_name).transformer_cls()
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as e:
        raise FormatError(f"{where}: the config does not build a {cls.__name__} ({str(e)[:200]}); fix --config")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


