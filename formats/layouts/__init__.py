"""Every checkpoint layout ditkit reads and writes, in one registry; loading and saving dispatch through it.

Sources (load_bundle):
  - an embedded default by name (tiny-digits), or no SRC at all;
  - an ONNX bundle directory (transformer.onnx; onnx.py), run by onnxruntime;
  - a quantized bundle (a pipeline or transformer directory with quantization.json; quantized.py);
  - a diffusers pipeline directory (model_index.json; pipeline.py);
  - a bare transformer directory (config.json + safetensors; transformer.py);
  - a .safetensors file in the authors' keys (BFL Flux, Stability SD3/SD3.5, PixArt, DiT; original.py, mapped by
    formats/authors.py): family and architecture from the keys and shapes;
  - a single .safetensors file (--family, plus --config when the keys don't determine it; single_file.py);
  - a facebookresearch/DiT or PixArt .pt/.pth checkpoint (read with weights_only=True, converted to diffusers
    keys; original.py).
  - a .gguf file (dequantized to float tensors on load; gguf.py).
The first layout in LAYOUTS whose `detect(path)` holds loads the path. save_bundle writes with the first layout
whose `writes(bundle)` holds (quantized, then pipeline, then transformer). A new layout is one module with a
LAYOUT and one line here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..atomic import atomic_dir
from ..bundle import Bundle
from ..errors import FormatError
from ..manifest import write_manifest
from ..quantized import transformer_bytes
from . import gguf, onnx, original, pipeline, quantized, single_file, transformer
from .base import Layout

LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (
    onnx.LAYOUT, quantized.LAYOUT, pipeline.LAYOUT, transformer.LAYOUT, original.LAYOUT, single_file.LAYOUT,
    original.PT_LAYOUT, gguf.LAYOUT)}  # detection order: first match wins

ASSETS = Path(__file__).parent.parent / "assets"
DEFAULT_MODELS = {"tiny-digits": ASSETS / "tiny-digits", "tiny-digits-text": ASSETS / "tiny-digits-text"}
DEFAULT_MODEL = "tiny-digits"


# -- loading ---------------------------------------------------------------------------------------

def resolve_source(src: str | os.PathLike | None) -> Path:
    if src is None or str(src) in DEFAULT_MODELS:
        name = DEFAULT_MODEL if src is None else str(src)
        path = DEFAULT_MODELS[name]
        if not (path / "model_index.json").is_file():
            raise FormatError(f"the embedded model {name} is missing from the installation ({path}); reinstall ditkit")
        return path
    path = Path(src).expanduser()
    if not path.exists():
        raise FormatError(f"{path} does not exist; give a checkpoint directory, a .safetensors/.pt file, "
                          f"or one of: {', '.join(DEFAULT_MODELS)}")
    return path


def layout_of(path: Path) -> Layout:
    """The layout that reads `path` (the first in LAYOUTS that detects it)."""
    layout = next((lay for lay in LAYOUTS.values() if lay.detect(path)), None)
    if layout is not None:
        return layout
    if path.is_dir():
        raise FormatError(f"{path} is not a checkpoint: expected model_index.json (diffusers pipeline) "
                          "or config.json + safetensors (transformer)")
    raise FormatError(f"{path}: unknown checkpoint file type {path.suffix!r}; use .safetensors, .gguf or a DiT / PixArt .pt")


def load_bundle(src: str | os.PathLike | None = None, *, family: str | None = None, config: str | None = None,
                device: str = "cpu", dtype: torch.dtype = torch.float32) -> Bundle:
    path = resolve_source(src)
    bundle = layout_of(path).load(path, family=family, config=config, device=device)
    for name, comp in [("transformer", bundle.transformer), *bundle.components.items()]:
        if isinstance(comp, nn.Module):
            comp.eval().requires_grad_(False)
            place(comp, device, dtype if name in ("transformer", "vae") else None)
    if isinstance(bundle.transformer, nn.Module):  # what the config does not hold (DiT's timestep shift)
        bundle.family.apply_conventions(bundle.transformer, bundle.manifest.get("conventions") or {})
    if path.is_dir() and bundle.kind in ("pipeline", "transformer"):
        from ..feedback import load_feedback

        bundle.feedback = load_feedback(path, bundle.family, bundle.transformer)
    return bundle


def place(module: nn.Module, device: str, dtype: torch.dtype | None = None) -> None:
    """Move a module only where it is not already (diffusers warns on no-op dtype casts)."""
    p = next(module.parameters(), None)
    if p is None:
        return
    if p.device.type != torch.device(device).type:
        module.to(device)
    if dtype is not None and p.dtype != dtype:
        module.to(dtype)


# -- saving ----------------------------------------------------------------------------------------

def save_bundle(bundle: Bundle, out: os.PathLike, manifest: dict, force: bool = False) -> Path:
    """Write the bundle atomically as a diffusers directory + judge + ditkit.json; returns the path."""
    out = Path(out)
    manifest = with_conventions(bundle, manifest)
    with atomic_dir(out, force=force) as tmp:
        write_bundle_dir(bundle, tmp)
        write_manifest(tmp, manifest)
    return out


def with_conventions(bundle: Bundle, manifest: dict) -> dict:
    """The manifest with the transformer's conventions (Family.conventions: DiT's timestep shift) recorded."""
    if "conventions" in manifest or not isinstance(bundle.transformer, nn.Module):
        return manifest
    conv = bundle.family.conventions(bundle.transformer)
    return {**manifest, "conventions": conv} if conv else manifest


def save_quantized(bundle: Bundle, out: os.PathLike, manifest: Callable[[int], dict], force: bool = False) -> Path:
    """Write atomically; `manifest(transformer_bytes_on_disk)` builds ditkit.json once the bytes are known."""
    out = Path(out)
    with atomic_dir(out, force=force) as tmp:
        write_bundle_dir(bundle, tmp)
        write_manifest(tmp, with_conventions(bundle, manifest(transformer_bytes(tmp))))
    return out


def write_bundle_dir(bundle: Bundle, root: Path) -> None:
    """The bundle's files in `root`, in the layout that writes it (quantized, pipeline or transformer)."""
    if bundle.feedback is not None:  # refuse before writing anything: a stale module must not be carried along
        from ..feedback import check_backbone

        check_backbone(bundle.feedback, bundle.transformer, str(root))
    layout = next(lay for lay in LAYOUTS.values() if lay.writes is not None and lay.writes(bundle))
    layout.save(bundle, root)


__all__ = ["DEFAULT_MODEL", "DEFAULT_MODELS", "LAYOUTS", "Layout", "layout_of", "load_bundle", "place",
           "resolve_source", "save_bundle", "save_quantized", "write_bundle_dir"]
