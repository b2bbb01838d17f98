"""An image folder as training data (lora-train --data, distill --images): the one reader every caller uses.

A folder is read in one of three layouts (the first that applies):

1. `metadata.jsonl` at the top: one JSON object per line with `file_name` (relative path) and a caption
   (`text` or `caption`) and/or a class id (`label`), e.g. {"file_name": "7.png", "text": "a typed seven",
   "label": 7}. This is Hugging Face `imagefolder`'s convention.
2. images at the top: `name.png`, with a caption `name.txt` beside each (every image needs one) or none at all.
3. class folders (class-conditional families such as dit): subfolders named by class id, `7/a.png`.

Images (.png .jpg .jpeg .webp .bmp) are converted to RGB, centre-cropped to the target aspect and resized
(bicubic) to the target size. The digest covers the pixels, captions and labels, so a changed folder
invalidates a cache built from it.

Containment: nothing outside the folder is read. A `file_name` that is absolute or climbs out (`../x.png`), a
symlink (file or class folder) whose target lies outside, and anything that is not a regular file (a FIFO, a
device node) are refused with a FormatError naming the entry, before any image is decoded. Captions and
metadata.jsonl are read through formats/reading.py (size cap, UTF-8); an image larger than PIL's
decompression-bomb limit is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FormatError
from .reading import loads, read_text

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


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

    def tensors(self):
        """(images (N, 3, H, W) float in [-1, 1], the VAE's input range; labels or None)."""
        import torch

        x = torch.from_numpy(self.images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
        return x, self.labels


class _Folder:
    """The data root and the containment rule: every path read must resolve to a regular file inside it."""

    def __init__(self, root: Path, flag: str):
        self.root, self.flag = Path(root), flag
        self.real = self.root.resolve()

    def inside(self, p: Path) -> bool:
        return p.resolve().is_relative_to(self.real)

    def file(self, p: Path, what: str = "") -> Path:
        """`p` if it is a regular file inside the folder (symlinks followed); else FormatError naming it."""
        rel = os.path.relpath(p, self.root)
        if not self.inside(p):
            raise FormatError(f"{self.flag} {self.root}: {what}{rel} leads outside the data folder "
                              f"(to {p.resolve()}); copy the file into the folder")
        try:
            mode = os.stat(p).st_mode
        except OSError:
            raise FormatError(f"{self.flag} {self.root}: {what}{rel} does not exist")
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) \
                else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise FormatError(f"{self.flag} {self.root}: {what}{rel} is {kind}, not an image file; remove it")
        return p

    def images_in(self, d: Path) -> list[Path]:
        """Image-named entries of `d`, sorted; each checked by file() (a FIFO named x.png is refused)."""
        return [self.file(p) for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_EXTS]

    def class_dirs(self) -> list[Path]:
        subs = []
        for d in self.root.iterdir():
            if d.name.isdigit() and d.is_dir():
                if not self.inside(d):
                    raise FormatError(f"{self.flag} {self.root}: class folder {d.name} leads outside the data "
                                      f"folder (to {d.resolve()}); copy it into the folder")
                subs.append(d)
        return sorted(subs, key=lambda d: int(d.name))


def read_image(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """(H, W, 3) uint8; centre-cropped to the aspect of `size` (H, W) and resized (bicubic) when given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refuse, never decode
            img = Image.open(path).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FormatError(f"image {path} has more than {Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb?); "
                          "resize it first") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise FormatError(f"cannot read image {path} ({str(e)[:120]}); remove or fix it") from None
    if size is not None and img.size != (size[1], size[0]):
        h, w = size
        W, H = img.size
        scale = max(w / W, h / H)  # centre-crop to the target aspect, then resize
        cw, ch = round(w / scale), round(h / scale)
        left, top = (W - cw) // 2, (H - ch) // 2
        img = img.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _read_metadata(folder: _Folder) -> list[tuple[int, dict, Path]]:
    """(line number, row, image path) per entry; every file_name checked to lie inside the folder."""
    meta = folder.file(folder.root / METADATA)
    rows = []
    for i, line in enumerate(read_text(meta, METADATA).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = loads(line, f"{meta} line {i}", "line")
        except FormatError:
            raise FormatError(f"{meta} line {i} is not JSON; one object per line") from None
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name:
            raise FormatError(f"{meta} line {i} needs a \"file_name\" field (a relative path)")
        if os.path.isabs(name) or "\x00" in name:
            raise FormatError(f"{meta} line {i}: file_name {name[:80]!r} is absolute; give a path inside "
                              f"{folder.root}")
        p = folder.root / name
        if not folder.inside(p):
            raise FormatError(f"{meta} line {i}: file_name {name[:80]!r} leads outside the data folder; give a "
                              f"path inside {folder.root}")
        folder.file(p, f"{METADATA} line {i}: ")
        rows.append((i, row, p))
    if not rows:
        raise FormatError(f"{meta} is empty; list one image per line")
    return rows


def read_image_folder(root: Path, size: tuple[int, int] | None = None, flag: str = "--data") -> ImageFolder:
    """Read images with captions or class labels from `root` (layouts in the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FormatError(f"{flag} {root} is not a directory; give a folder of images with captions or labels")
    folder = _Folder(root, flag)
    if (root / METADATA).exists() or (root / METADATA).is_symlink():
        rows = _read_metadata(folder)
        files, captions, labels = [], [], []
        for i, row, _ in rows:
            files.append(row["file_name"])
            cap = row.get("text", row.get("caption"))
            if cap is not None and not isinstance(cap, str):
                raise FormatError(f"{root / METADATA} line {i}: the caption must be a string")
            captions.append(cap)
            label = row.get("label")
            if label is not None and (type(label) is not int or not 0 <= label < 2**31):
                raise FormatError(f"{root / METADATA} line {i}: label must be a class id >= 0 (got {str(label)[:40]})")
            labels.append(label)
        caps = _all_or_none(captions, files, "a \"text\" caption", root / METADATA)
        labs = _all_or_none(labels, files, "a \"label\"", root / METADATA)
        images = [read_image(p, size) for _, _, p in rows]
        layout = METADATA
    else:
        top = folder.images_in(root)
        if top:
            txt = [p.with_suffix(".txt") for p in top]
            missing = [p.name for p, t in zip(top, txt) if not (t.exists() or t.is_symlink())]
            if missing and len(missing) < len(top):
                raise FormatError(f"{root}: images without a caption file: {', '.join(missing[:5])}; "
                                  "add name.txt beside each name.png")
            caps = None if missing else [read_text(folder.file(t), "caption file").strip() for t in txt]
            files = [p.name for p in top]
            labs = None
            images = [read_image(p, size) for p in top]
            layout = "captions" if caps is not None else "images"
        else:
            subs = folder.class_dirs()
            if not subs:
                raise FormatError(f"{flag} {root} has no images: give name.png + name.txt pairs, a {METADATA}, "
                                  "or class folders named by id (0/, 1/, ...)")
            paths = [(p, int(d.name)) for d in subs for p in folder.images_in(d)]
            files = [str(p.relative_to(root)) for p, _ in paths]
            labs = [c for _, c in paths]
            caps = None
            images = [read_image(p, size) for p, _ in paths]
            layout = "class-folders"
    if not images:
        raise FormatError(f"{flag} {root} has no images")
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
