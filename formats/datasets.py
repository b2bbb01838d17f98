"""Training data on disk for lora-train: an image folder with captions or class labels, and its encoded cache.

An image folder is read in one of three layouts (the first that applies):

1. `metadata.jsonl` at the top: one JSON object per line with `file_name` (relative path) and a caption
   (`text` or `caption`) and/or a class id (`label`), e.g. {"file_name": "7.png", "text": "a typed seven",
   "label": 7}. This is Hugging Face `imagefolder`'s convention.
2. captions beside images: `name.txt` next to `name.png` (every image needs one).
3. class folders (class-conditional families such as dit): subfolders named by class id, `7/a.png`.

Images (.png .jpg .jpeg .webp .bmp) are converted to RGB, centre-cropped to the target aspect and resized
(bicubic) to the model's native size. The digest covers the pixels, captions and labels, so a changed folder
invalidates the cache.

The cache (`data.safetensors` in the checkpoint directory) holds what was computed once from the folder:
VAE latent means/stds, text embeddings, labels; its metadata holds a key over the data digest, the base
weights and the encoding settings, and a cache whose key differs is ignored (recomputed).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_file
from .errors import FormatError
from .safetensors_check import read_header

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"
CACHE = "data.safetensors"


@dataclass
class ImageFolder:
    images: np.ndarray  # (N, H, W, 3) uint8
    files: list[str]  # relative paths, in order
    captions: list[str] | None  # one per image, or None
    labels: list[int] | None  # one per image, or None
    source: str
    layout: str  # metadata.jsonl, captions, class-folders, images

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(json.dumps([self.files, self.captions, self.labels]).encode())
        return h.hexdigest()

    def describe(self) -> dict:
        d = {"source": self.source, "layout": self.layout, "images": len(self.files),
             "size": list(self.images.shape[1:3])}
        if self.captions is not None:
            d["unique_captions"] = len(set(self.captions))
        if self.labels is not None:
            d["classes"] = sorted(set(self.labels))
        return d


def _images_in(root: Path, recursive: bool = False) -> list[Path]:
    it = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _read_image(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise FormatError(f"cannot read image {path} ({e}); remove or fix it")
    if size is not None and img.size != (size[1], size[0]):
        h, w = size
        W, H = img.size
        scale = max(w / W, h / H)  # centre-crop to the target aspect, then resize
        cw, ch = round(w / scale), round(h / scale)
        left, top = (W - cw) // 2, (H - ch) // 2
        img = img.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _read_metadata(root: Path) -> list[dict]:
    rows = []
    for i, line in enumerate((root / METADATA).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(f"{root / METADATA} line {i} is not JSON ({e.msg}); one object per line")
        if not isinstance(row, dict) or "file_name" not in row:
            raise FormatError(f"{root / METADATA} line {i} needs a \"file_name\" field")
        rows.append(row)
    if not rows:
        raise FormatError(f"{root / METADATA} is empty; list one image per line")
    return rows


def read_image_folder(root: Path, size: tuple[int, int] | None = None) -> ImageFolder:
    """Read images with captions or class labels from `root` (layouts in the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FormatError(f"--data {root} is not a directory; give a folder of images with captions or labels")
    if (root / METADATA).is_file():
        rows = _read_metadata(root)
        files, captions, labels = [], [], []
        for i, row in enumerate(rows, 1):
            p = root / row["file_name"]
            if not p.is_file():
                raise FormatError(f"{root / METADATA} line {i}: {row['file_name']} does not exist")
            files.append(row["file_name"])
            captions.append(row.get("text", row.get("caption")))
            label = row.get("label")
            if label is not None and (not isinstance(label, int) or label < 0):
                raise FormatError(f"{root / METADATA} line {i}: label must be a class id >= 0 (got {label!r})")
            labels.append(label)
        caps = _all_or_none(captions, files, "a \"text\" caption", root / METADATA)
        labs = _all_or_none(labels, files, "a \"label\"", root / METADATA)
        images = [_read_image(root / f, size) for f in files]
        layout = METADATA
    else:
        top = _images_in(root)
        if top:
            missing = [p.name for p in top if not p.with_suffix(".txt").is_file()]
            if missing and len(missing) < len(top):
                raise FormatError(f"{root}: images without a caption file: {', '.join(missing[:5])}; "
                                  "add name.txt beside each name.png")
            caps = None if missing else [p.with_suffix(".txt").read_text().strip() for p in top]
            files = [p.name for p in top]
            labs = None
            images = [_read_image(p, size) for p in top]
            layout = "captions" if caps is not None else "images"
        else:
            subs = sorted((d for d in root.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
            if not subs:
                raise FormatError(f"{root} has no images: give name.png + name.txt pairs, a {METADATA}, "
                                  "or class folders named by id (0/, 1/, ...)")
            paths = [(p, int(d.name)) for d in subs for p in _images_in(d)]
            files = [str(p.relative_to(root)) for p, _ in paths]
            labs = [c for _, c in paths]
            caps = None
            images = [_read_image(p, size) for p, _ in paths]
            layout = "class-folders"
    if not images:
        raise FormatError(f"{root} has no images")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise FormatError(f"{root}: images have different sizes {sorted(shapes)[:3]}; pass a target size")
    return ImageFolder(images=np.stack(images), files=files, captions=caps, labels=labs, source=str(root),
                       layout=layout)


def _all_or_none(values: list, files: list[str], what: str, where: Path):
    have = [v is not None for v in values]
    if not any(have):
        return None
    if not all(have):
        lacking = [f for f, h in zip(files, have) if not h]
        raise FormatError(f"{where}: images without {what}: {', '.join(lacking[:5])}; give every image one or none")
    return values


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
