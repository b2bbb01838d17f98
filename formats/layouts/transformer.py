"""A bare transformer directory: config.json + safetensors, as diffusers' save_pretrained writes it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..bundle import Bundle
from ..errors import FormatError
from .. import sanity
from ..families import detect_family
from ..manifest import read_manifest
from ..safetensors_check import check_tree, read_json
from .base import Layout, wrap_load_error, write_parts


def detect(path: Path) -> bool:
    p = path / "config.json"  # a FIFO or device there is refused by its reader (formats/reading.py), not skipped
    return path.is_dir() and (p.exists() or p.is_symlink())


def load(path: Path, *, family: str | None = None, config: str | None = None, device: str = "cpu") -> Bundle:
    return read(path)


def read(path: Path, rebuild: Callable | None = None) -> Bundle:
    """The transformer; `rebuild(path, family)` builds it where diffusers cannot (quantized)."""
    check_tree(path)
    conf = read_json(path / "config.json", "transformer config")
    fam = detect_family(conf, str(path / "config.json"))
    if not list(path.glob("*.safetensors")):
        raise FormatError(f"{path} has a config.json but no .safetensors weights (pickled .bin weights are not loaded)")
    sanity.check_weights_dir(fam, conf, path, rebuild is not None)  # before anything is built
    if rebuild is not None:
        model = rebuild(path, fam)
    else:
        try:
            model = fam.transformer_cls().from_pretrained(path, use_safetensors=True)
        except Exception as e:
            raise wrap_load_error(path, e) from e
    return Bundle(family=fam, transformer=model, manifest=read_manifest(path) or {}, path=path, kind="transformer")


def writes(bundle: Bundle) -> bool:
    return bundle.pipeline_class is None


def save(bundle: Bundle, root: Path) -> None:
    bundle.transformer.save_pretrained(root, safe_serialization=True)
    write_parts(bundle, root)


LAYOUT = Layout("transformer", "a bare transformer directory (config.json + safetensors)", detect, load, save, writes)
