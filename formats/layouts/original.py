"""Checkpoints in the model authors' own key layouts (formats/authors.py tells them apart and maps them):

  LAYOUT     a .safetensors file in BFL Flux, Stability SD3/SD3.5, PixArt or DiT keys, with or without the
             `model.diffusion_model.` prefix (flux1-dev.safetensors, sd3.5_large.safetensors, ComfyUI files);
  PT_LAYOUT  a .pt / .pth file (facebookresearch/DiT, PixArt-alpha/sigma): a state dict or a training checkpoint
             holding one, read with weights_only=True (tensors, containers and argparse.Namespace only: no code runs).

The family and the architecture come from the keys and shapes; `--config` supplies what they do not decide.
"""
from __future__ import annotations

import re
from pathlib import Path

from .. import authors
from ..bundle import Bundle
from ..errors import ConfigError, FormatError
from ..families import get_family
from ..manifest import parse_manifest
from ..reading import loads
from ..safetensors_check import read_header, read_json
from .base import Layout, from_state_dict


def _is_authors_safetensors(path: Path) -> bool:
    if path.is_dir() or path.suffix != ".safetensors":
        return False
    try:
        header = read_header(path)
    except FormatError:
        return False  # single_file reports what is wrong with it
    if "config" in (header.get("__metadata__") or {}):
        return False  # ditkit's own single file (diffusers keys, config in the metadata)
    return authors.identify(k for k in header if k != "__metadata__") is not None


def _is_pickle(path: Path) -> bool:
    return not path.is_dir() and path.suffix in (".pt", ".pth")


def _bundle(path: Path, state: dict, family: str | None, config: str | None, hints: dict,
            meta: dict | None = None) -> Bundle:
    lay = authors.identify(state)
    if lay is None:
        raise FormatError(f"{path}: its keys are in none of the layouts ditkit reads from .pt/.pth files "
                          f"({', '.join(authors.AUTHORS_LAYOUTS)}; e.g. {next(iter(state))!r}); save the model as "
                          "a diffusers directory or .safetensors")
    if family is not None and get_family(family).name != lay.family:
        raise ConfigError(f"{path} is a {lay.family} checkpoint in the {lay.name} layout; drop --family {family}")
    meta = meta or {}
    conf = read_json(Path(config), "--config") if config is not None else None
    if conf is None and "ditkit_config" in meta:  # ditkit wrote it (export --format <layout>): its exact config
        conf = loads(meta["ditkit_config"], f"{path} metadata")
    lay, conf, converted = authors.read(state, str(path), conf, hints)
    fam = get_family(lay.family)
    model = from_state_dict(fam, conf, converted, path)
    if "ditkit" in meta:
        manifest = parse_manifest(meta["ditkit"], f"{path} metadata")
    else:  # no ditkit.json: the authors' conventions (DiT's timestep shift) are recorded as this bundle's own
        manifest = {"conventions": dict(lay.conventions)} if lay.conventions else {}
    return Bundle(family=fam, transformer=model, path=path, kind=lay.name, manifest=manifest)


def load(path: Path, *, family: str | None = None, config: str | None = None, device: str = "cpu") -> Bundle:
    from safetensors.torch import load_file

    return _bundle(path, load_file(path), family, config, {}, read_header(path).get("__metadata__") or {})


def load_pt(path: Path, *, family: str | None = None, config: str | None = None, device: str = "cpu") -> Bundle:
    try:
        obj = authors.torch_load(path)
    except Exception as e:  # UnpicklingError for anything that is not plain tensors/containers
        m = re.search(r"Unsupported global: GLOBAL (\S+)|Unsupported operand \d+|Unsupported class \S+", str(e))
        what = (f"it references {m.group(1)}" if m.group(1) else m.group(0)) if m else type(e).__name__
        raise FormatError(f"{path} holds objects other than tensors and is refused without running them ({what}); "
                          "re-save the state dict alone (torch.save(model.state_dict(), ...))")
    state, hints = authors.unwrap(obj, str(path))
    return _bundle(path, state, family, config, hints)


LAYOUT = Layout("authors-safetensors", "a .safetensors file in the authors' keys (BFL Flux, Stability SD3, PixArt, "
                "DiT), the family and architecture read from the keys", _is_authors_safetensors, load)
PT_LAYOUT = Layout("authors-pt", "a DiT / PixArt .pt or .pth checkpoint (read as tensors only)", _is_pickle, load_pt)
