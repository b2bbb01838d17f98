"""Writers for `ditkit export`: one per format in ops.export.EXPORT_FORMATS (WRITERS below).

  onnx          formats.layouts.onnx.save_onnx_bundle (the staged graphs + scheduler, VAE, judge, ditkit.json)
  diffusers     formats.layouts.save_bundle (a diffusers directory + judge + ditkit.json)
  safetensors   save_single_file: one file; header metadata "config" (the transformer's config.json as a
                JSON string), "family", "ditkit" (the manifest, JSON) and "format": "pt". formats.bundle
                reads it back (load_bundle FILE needs no --family or --config).
  dit-original  save_dit_original: a facebookresearch/DiT state dict saved with torch.save, the layout
                DiT's sample.py loads. A plain dict of tensors, so ditkit reads it with weights_only=True.
                It is the only pickle-format file ditkit writes, because it is that project's own format;
                it has no room for a manifest (ditkit keeps none beside it).
  bfl-flux, stability-sd3, pixart-original
                save_authors_file: one .safetensors file in the authors' keys (formats/authors.py), the layouts
                ComfyUI and the authors' code read (Stability's with its model.diffusion_model. prefix); header
                metadata "ditkit_config" (the exact diffusers config) and "ditkit" (the manifest).
  gguf          save_gguf: one .gguf file (formats/gguf.py): the transformer quantized with --quant, in the
                key layout its readers expect, the config and manifest in its metadata.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import atomic_file


def _plain_state(model) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def single_file_meta(bundle, manifest: dict) -> dict:
    config = json.loads(bundle.transformer.to_json_string())
    return {"format": "pt", "config": json.dumps(config, sort_keys=True), "family": bundle.family.name,
            "ditkit": json.dumps(manifest, sort_keys=True, default=str)}


def single_file_bytes(bundle, manifest: dict) -> tuple[bytes, dict]:
    """The .safetensors bytes for `bundle`'s transformer and the metadata they carry (for in-memory checks)."""
    from safetensors.torch import save

    meta = single_file_meta(bundle, manifest)
    return save(_plain_state(bundle.transformer), metadata=meta), meta


def save_single_file(bundle, out: os.PathLike, manifest: dict, force: bool = False) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    with atomic_file(out, force=force) as tmp:
        save_file(_plain_state(bundle.transformer), str(tmp), metadata=single_file_meta(bundle, manifest))
    return out


def save_dit_original(bundle, out: os.PathLike, manifest: dict, force: bool = False) -> Path:
    import torch

    from .dit_original import from_diffusers

    state = from_diffusers(bundle.transformer)  # FormatError when the blocks' embedders differ
    out = Path(out)
    with atomic_file(out, force=force) as tmp:
        torch.save(state, tmp)
    return out


def save_diffusers(bundle, out: os.PathLike, manifest: dict, force: bool = False) -> Path:
    from .layouts import save_bundle

    return save_bundle(bundle, out, manifest, force=force)


def save_onnx(bundle, out: os.PathLike, manifest: dict, force: bool = False) -> Path:
    from .layouts.onnx import save_onnx_bundle

    return save_onnx_bundle(bundle, out, manifest, force=force)


def save_gguf(bundle, out: os.PathLike, manifest: dict, force: bool = False) -> Path:
    from .gguf import save_gguf_file

    return save_gguf_file(bundle, out, manifest, force=force)


def save_authors_file(fmt: str):
    def save(bundle, out: os.PathLike, manifest: dict, force: bool = False) -> Path:
        from safetensors.torch import save_file

        from .authors import file_metadata, file_state

        state = file_state(fmt, bundle.transformer)  # FormatError before anything is written
        out = Path(out)
        with atomic_file(out, force=force) as tmp:
            save_file(state, str(tmp), metadata=file_metadata(bundle, manifest))
        return out
    return save


WRITERS = {
    "onnx": save_onnx,
    "diffusers": save_diffusers,
    "safetensors": save_single_file,
    "dit-original": save_dit_original,
    "gguf": save_gguf,
    **{fmt: save_authors_file(fmt) for fmt in ("bfl-flux", "stability-sd3", "pixart-original")},
}
