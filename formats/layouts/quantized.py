"""A quantized bundle (`ditkit quantize` output): a pipeline or transformer directory whose transformer is in the
quantized layout of formats/quantized.py (quantization.json + plain tensors), rebuilt for the target device."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .. import quantized
from ..bundle import Bundle
from . import pipeline, transformer
from .base import Layout


def detect(path: Path) -> bool:
    if not path.is_dir():
        return False
    if pipeline.detect(path):
        return quantized.is_quantized_dir(path / "transformer")
    return transformer.detect(path) and quantized.is_quantized_dir(path)


def load(path: Path, *, family: str | None = None, config: str | None = None, device: str = "cpu") -> Bundle:
    def rebuild(root: Path, fam):
        return quantized.load_transformer(root, fam, device)

    return pipeline.read(path, rebuild) if pipeline.detect(path) else transformer.read(path, rebuild)


def writes(bundle: Bundle) -> bool:
    return quantized.is_quantized(bundle.transformer)


def save(bundle: Bundle, root: Path) -> None:
    """The bundle as a diffusers directory whose transformer/ is in the quantized layout."""
    tr = bundle.transformer
    if bundle.pipeline_class is None:
        quantized.write_transformer(tr, root)
        return
    pipeline.save(replace(bundle, transformer=None), root)  # every other component, as diffusers saves it
    quantized.write_transformer(tr, Path(root) / "transformer")
    index_path = Path(root) / "model_index.json"
    index = json.loads(index_path.read_text())
    index["transformer"] = ["diffusers", type(tr).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


LAYOUT = Layout("quantized", "a pipeline or transformer directory whose transformer is ditkit-quantized "
                "(quantization.json)", detect, load, save, writes)
