"""Cheap structural checks of safetensors files and JSON configs, so corruption gets a precise message.

Every function here raises FormatError (never another exception) on any input: tests/test_fuzz.py feeds
them random and mutated bytes with hypothesis.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

from .errors import FormatError
from .reading import loads as _json_loads
from .reading import read_json, regular_file  # noqa: F401 - read_json's home is formats/reading.py

MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own bound on the JSON header
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
               "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
               "U64": 8, "F64": 8, "C64": 8}
MAX_DIM = 1 << 16  # bound on an architecture field of a config (widths, heads, layers, sizes): no DiT comes close


def read_header(path: Path) -> dict:
    """Parse and validate a safetensors header; raise FormatError naming the file if it is damaged."""
    path = Path(path)
    size = regular_file(path, "weights file")  # a FIFO would block the open below forever
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path} is truncated ({size} bytes): re-copy or re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(f"{path} is truncated or not a safetensors file (header says {n} bytes, file has {size}): re-copy it")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"cannot read {path} ({e.strerror or type(e).__name__}); check the path and permissions")
    try:
        header = _json_loads(raw, path, "file")
    except FormatError as e:
        if "appears twice" in str(e):
            raise FormatError(f"{path} lists a tensor twice in its safetensors header; re-save it") from None
        raise FormatError(f"{path} has a corrupt safetensors header: re-copy it") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path} has a corrupt safetensors header: re-copy it")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise FormatError(f"{path} has corrupt safetensors metadata: re-copy it")
            continue
        try:
            begin, stop = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (TypeError, KeyError, ValueError):
            raise FormatError(f"{path}: tensor {name!r} has a corrupt header entry: re-copy the file")
        if not (type(begin) is int and type(stop) is int and 0 <= begin <= stop):
            raise FormatError(f"{path}: tensor {name!r} has invalid offsets: re-copy the file")
        if (not isinstance(dtype, str) or dtype not in DTYPE_BYTES or not isinstance(shape, list)
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise FormatError(f"{path}: tensor {name!r} has an invalid dtype or shape: re-copy the file")
        if math.prod(shape) * DTYPE_BYTES[dtype] != stop - begin:
            raise FormatError(f"{path}: tensor {name!r} has {stop - begin} bytes for shape {shape} {dtype}: re-copy the file")
        spans.append((begin, stop))
    end = 0
    for begin, stop in sorted(spans):  # the spec: tensors tile the data buffer, no gaps, no overlaps
        if begin != end:
            raise FormatError(f"{path}: tensor data overlaps or leaves gaps (offset {begin}, expected {end}): re-copy it")
        end = stop
    if 8 + n + end != size:
        raise FormatError(f"{path} is truncated or padded ({size} bytes, header expects {8 + n + end}): re-copy it")
    return header


ARCH_FIELDS = ("sample_size", "patch_size", "num_layers", "num_single_layers", "num_attention_heads",
               "attention_head_dim", "in_channels", "out_channels", "num_embeds_ada_norm", "caption_channels",
               "cross_attention_dim", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
               "pos_embed_max_size")
COUNT_FIELDS = ("num_layers", "num_single_layers")  # block counts: depth pruning may remove a whole stack


def finite_floats(value, where) -> None:
    """Every float inside a JSON value is finite (NaN or inf in a config gives blank images, not an error)."""
    stack = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise FormatError(f"{where}: {path or 'a value'} is {v}; it must be a finite number")
        if isinstance(v, dict):
            stack.extend((f"{path}.{k}" if path else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))


def check_config(config: dict, where: str = "config") -> dict:
    """The architecture fields a transformer config.json sets must be positive integers (not strings,
    floats, negatives or absurd sizes): a wrong field is named here instead of failing deep in diffusers."""
    if not isinstance(config, dict):
        raise FormatError(f"{where} must hold a JSON object")
    finite_floats(config, where)  # norm_eps: NaN builds a model that makes blank images
    cls = config.get("_class_name")
    if cls is not None and not isinstance(cls, str):
        raise FormatError(f"{where}: _class_name must be a string (got {str(cls)[:40]!r})")
    for name in ARCH_FIELDS:
        v = config.get(name)
        if v is None:
            continue
        values = v if isinstance(v, list) and v else [v]
        low = 0 if name in COUNT_FIELDS else 1
        if not all(type(x) is int and low <= x <= MAX_DIM for x in values):
            kind = "a non-negative" if low == 0 else "a positive"
            raise FormatError(f"{where}: {name} must be {kind} integer up to {MAX_DIM} (got {str(v)[:40]}); "
                              "restore the config")
    return config


def check_tree(root: Path) -> None:
    """Validate every JSON config and safetensors file under a checkpoint directory."""
    root = Path(root)
    for p in sorted(root.rglob("*.json")):
        read_json(p)
    for p in sorted(root.rglob("*.safetensors")):
        read_header(p)


def checkpoint_bytes(path: Path, float_bytes: int | None = None) -> int:
    """Bytes the tensors of a checkpoint take once loaded, from headers alone (nothing is read but them):
    every .safetensors under `path` (floating tensors counted at `float_bytes` each when given: the dtype
    they will be cast to), or the file size of anything else (.pt, .onnx + external data)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    total = 0
    for p in files:
        if p.suffix == ".safetensors":
            for name, info in read_header(p).items():
                if name == "__metadata__":
                    continue
                n = math.prod(info["shape"])
                floating = info["dtype"] in ("F16", "BF16", "F32", "F64")
                total += n * (float_bytes if float_bytes and floating else DTYPE_BYTES[info["dtype"]])
        elif p.suffix in (".pt", ".pth", ".onnx", ".data", ".bin") or p.name.endswith(".onnx.data"):
            total += p.stat().st_size
    return int(total)
