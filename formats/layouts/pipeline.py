"""A diffusers pipeline directory: model_index.json, one folder per component, the judge in judge/."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..bundle import Bundle
from ..errors import UnsupportedModelError
from .. import sanity
from ..families import detect_family
from ..manifest import read_manifest
from ..safetensors_check import check_tree, read_json
from .base import Layout, wrap_load_error, write_parts


def detect(path: Path) -> bool:
    p = path / "model_index.json"  # a FIFO or device there is refused by its reader (formats/reading.py), not skipped
    return path.is_dir() and (p.exists() or p.is_symlink())


def load(path: Path, *, family: str | None = None, config: str | None = None, device: str = "cpu") -> Bundle:
    return read(path)


def read(path: Path, rebuild: Callable | None = None) -> Bundle:
    """The pipeline; `rebuild(transformer_dir, family)` builds its transformer where diffusers cannot (quantized)."""
    import diffusers

    check_tree(path)
    index = read_json(path / "model_index.json", "pipeline index")
    tconf = read_json(path / "transformer" / "config.json", "transformer config")
    fam = detect_family(tconf, str(path / "transformer" / "config.json"))
    sanity.check_weights_dir(fam, tconf, path / "transformer", rebuild is not None)  # before building
    cls = getattr(diffusers, index.get("_class_name", ""), None)
    if cls is None:
        raise UnsupportedModelError(f"{path}: pipeline class {index.get('_class_name')!r} is not in diffusers")
    expected, _ = cls._get_signature_keys(cls)
    absent = {k: None for k in expected if k not in index or index[k] in (None, [None, None])}
    absent.pop("transformer", None)
    if rebuild is not None:
        absent["transformer"] = rebuild(path / "transformer", fam)
    try:
        pipe = cls.from_pretrained(path, use_safetensors=True, **absent)
    except Exception as e:  # diffusers raises many types for bad checkpoints
        raise wrap_load_error(path, e) from e
    components = {k: v for k, v in pipe.components.items() if k != "transformer" and v is not None}
    extra = {}
    if "id2label" in index:
        extra["id2label"] = {int(k): v for k, v in index["id2label"].items()}
    judge = None
    from ..judge import DIR, load_judge

    if (path / DIR).is_dir():
        judge = load_judge(path / DIR).judge  # a Judge with its reference statistics set
    return Bundle(family=fam, transformer=pipe.transformer, components=components,
                  pipeline_class=index.get("_class_name", fam.pipeline_class), pipeline_extra=extra,
                  manifest=read_manifest(path) or {}, path=path, kind="pipeline", judge=judge)


def writes(bundle: Bundle) -> bool:
    return bundle.pipeline_class is not None


def save(bundle: Bundle, root: Path) -> None:
    import diffusers

    cls = getattr(diffusers, bundle.pipeline_class)
    expected, _ = cls._get_signature_keys(cls)
    parts = {k: None for k in expected if k not in bundle.components and k != "transformer"}
    parts.update(bundle.components)
    pipe = cls(transformer=bundle.transformer, **parts, **bundle.pipeline_extra)
    pipe.save_pretrained(root, safe_serialization=True)
    if bundle.pipeline_extra:  # keep non-module args (DiT's id2label) in model_index.json
        index_path = Path(root) / "model_index.json"
        index = json.loads(index_path.read_text())
        index.update({k: v for k, v in bundle.pipeline_extra.items()})
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    write_parts(bundle, root)


LAYOUT = Layout("pipeline", "a diffusers pipeline directory (model_index.json)", detect, load, save, writes)
