"""A facebookresearch/DiT .pt checkpoint: read with weights_only=True (no code runs), converted to diffusers keys."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .. import dit_original
from ..bundle import Bundle
from ..errors import ConfigError, FormatError
from ..families import get_family
from .base import Layout, from_state_dict


def detect(path: Path) -> bool:
    return not path.is_dir() and path.suffix in (".pt", ".pth")


def load(path: Path, *, family: str | None = None, config: str | None = None, device: str = "cpu") -> Bundle:
    if family not in (None, "dit"):
        raise ConfigError(f"{path}: .pt checkpoints are read as facebookresearch/DiT only; drop --family {family}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything that is not plain tensors/containers
        m = re.search(r"Unsupported global: GLOBAL (\S+)|Unsupported operand \d+|Unsupported class \S+", str(e))
        what = (f"it references {m.group(1)}" if m.group(1) else m.group(0)) if m else type(e).__name__
        raise FormatError(f"{path} holds objects other than tensors and is refused without running them ({what}); "
                          "re-save the state dict alone (torch.save(model.state_dict(), ...))")
    state = dit_original.unwrap(obj, path)
    conf, converted = dit_original.to_diffusers(state, path)
    model = from_state_dict(get_family("dit"), conf, converted, path)
    return Bundle(family=get_family("dit"), transformer=model, path=path, kind="dit-original")


LAYOUT = Layout("dit-original", "a facebookresearch/DiT .pt checkpoint (read as tensors only)", detect, load)
