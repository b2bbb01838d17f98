"""Generated images on disk: one PNG per image, a grid PNG and a JSON sidecar, written atomically."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import atomic_dir

SIDECAR = "generate.json"


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    n, h, w, c = images.shape
    cols = cols or min(n, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return out


def write_images(out: Path, images: np.ndarray, sidecar: dict, force: bool = False, cols: int | None = None) -> Path:
    with atomic_dir(out, force=force) as tmp:
        for i, img in enumerate(images):
            Image.fromarray(img).save(tmp / f"{i:05d}.png")
        Image.fromarray(grid(images, cols)).save(tmp / "grid.png")
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
    return Path(out)


def read_images(root: Path) -> np.ndarray:
    files = sorted(p for p in Path(root).glob("[0-9]*.png"))
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
