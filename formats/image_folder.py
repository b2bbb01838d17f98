"""An image folder as training data: DIR/<class id>/*.png (class labels) or DIR/*.png (no labels).

Images are read in name order, converted to RGB, resized (bicubic) to the model's pixel size and returned as
float tensors in [-1, 1], the VAE's input range.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, FormatError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def read_image_folder(root: Path, size: tuple[int, int]) -> tuple[torch.Tensor, list[int] | None]:
    """(images (N, 3, H, W) float in [-1, 1], labels or None). Sub-folders named by integers are classes."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FormatError(f"--images {root} is not a directory")
    classes = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if classes:
        items = [(f, int(c.name)) for c in classes for f in _files(c)]
    else:
        items = [(f, None) for f in _files(root)]
    if not items:
        raise ConfigError(f"--images {root} holds no images ({', '.join(EXTENSIONS)}), neither directly nor in "
                          "class sub-folders named 0, 1, ...")
    out = []
    for f, _ in items:
        try:
            img = Image.open(f).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
        except OSError as e:
            raise FormatError(f"--images: {f} is not a readable image ({e})")
        out.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
    labels = [l for _, l in items] if classes else None
    return x, labels
