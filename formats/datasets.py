"""Training data's encoded cache and validation grids (the image folder itself: formats/image_folder.py).

The cache (`data.safetensors` in the checkpoint directory) holds what was computed once from the folder:
VAE latent means/stds, text embeddings, labels; its metadata holds a key over the data digest, the base
weights and the encoding settings, and a cache whose key differs is ignored (recomputed).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_file
from .image_folder import IMAGE_EXTS, METADATA, ImageFolder, read_image_folder  # noqa: F401 - their old home
from .safetensors_check import read_header

CACHE = "data.safetensors"


# -- the encoded cache -------------------------------------------------------------------------------

def save_cache(path: Path, tensors: dict[str, torch.Tensor], key: str, info: dict) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, force=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"key": key, "info": json.dumps(info, default=str)})
    return path


def load_cache(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, info) when `path` holds a cache made with the same key; None otherwise."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        return None
    meta = read_header(path).get("__metadata__") or {}
    if meta.get("key") != key:
        return None
    try:
        return load_file(str(path)), json.loads(meta.get("info", "{}"))
    except Exception:  # a damaged cache is recomputed, never trusted
        return None


def save_validation(root: Path, step: int, images: np.ndarray, conditions: list, metrics: dict) -> Path:
    """A validation grid `validation/step-000100.png` and its conditions/metrics beside it (JSON)."""
    from PIL import Image

    from .images import grid

    d = Path(root) / "validation"
    d.mkdir(parents=True, exist_ok=True)
    png = d / f"step-{step:06d}.png"
    with atomic_file(png, force=True) as tmp:
        Image.fromarray(grid(images)).save(tmp, format="PNG")
    with atomic_file(png.with_suffix(".json"), force=True) as tmp:
        tmp.write_text(json.dumps({"step": step, "conditions": conditions, "metrics": metrics}, default=str) + "\n")
    return png
