"""Cheap structural checks of safetensors files and JSON configs, so corruption gets a precise message."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from .errors import FormatError

MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own bound on the JSON header


def read_header(path: Path) -> dict:
    """Parse and validate a safetensors header; raise FormatError naming the file if it is damaged."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path} is truncated ({size} bytes): re-copy or re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise FormatError(f"{path} is truncated or not a safetensors file (header says {n} bytes, file has {size}): re-copy it")
            header = json.loads(f.read(n))
    except OSError as e:
        raise FormatError(f"cannot read {path} ({e.strerror}); check the path and permissions")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path} has a corrupt safetensors header: re-copy it")
    if not isinstance(header, dict):
        raise FormatError(f"{path} has a corrupt safetensors header: re-copy it")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not isinstance(info, dict):
                raise FormatError(f"{path} has corrupt safetensors metadata: re-copy it")
            continue
        try:
            begin, stop = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (TypeError, KeyError, ValueError):
            raise FormatError(f"{path}: tensor {name!r} has a corrupt header entry: re-copy the file")
        if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
            raise FormatError(f"{path}: tensor {name!r} has invalid offsets: re-copy the file")
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise FormatError(f"{path}: tensor {name!r} has an invalid dtype or shape: re-copy the file")
        end = max(end, stop)
    if 8 + n + end != size:
        raise FormatError(f"{path} is truncated or padded ({size} bytes, header expects {8 + n + end}): re-copy it")
    return header


def read_json(path: Path, what: str = "config") -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{path} is missing: the {what} must sit beside the weights")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON ({getattr(e, 'msg', e)}): restore the {what}")
    if not isinstance(data, dict):
        raise FormatError(f"{path} must hold a JSON object: restore the {what}")
    return data


def check_tree(root: Path) -> None:
    """Validate every JSON config and safetensors file under a checkpoint directory."""
    root = Path(root)
    for p in sorted(root.rglob("*.json")):
        read_json(p)
    for p in sorted(root.rglob("*.safetensors")):
        read_header(p)
