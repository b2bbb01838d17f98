"""A .gguf file (formats/gguf.py reads its bytes): the transformer rebuilt from its dequantized float tensors."""
from __future__ import annotations

from pathlib import Path

from ..bundle import Bundle
from ..families import get_family
from ..gguf import read_gguf
from ..manifest import parse_manifest
from ..safetensors_check import read_json
from .base import Layout, from_state_dict


def detect(path: Path) -> bool:
    return not path.is_dir() and path.suffix == ".gguf"


def load(path: Path, *, family: str | None = None, config: str | None = None, device: str = "cpu") -> Bundle:
    conf = read_json(Path(config), "--config") if config is not None else None
    fam, conf, state, meta = read_gguf(path, family, conf)
    model = from_state_dict(get_family(fam), conf, state, path)
    manifest = parse_manifest(meta["ditkit.manifest"], f"{path} metadata") if meta["ditkit.manifest"] else {}
    return Bundle(family=get_family(fam), transformer=model, path=path, kind="gguf", manifest=manifest)


LAYOUT = Layout("gguf", "a .gguf file (city96 layout for flux/sd3; dequantized to float on load)", detect, load)
