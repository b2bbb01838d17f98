"""The personalization style set: typed digits, rendered with the TrueType font Pillow ships (Aileron,
`ImageFont.load_default(size=...)`, Pillow >= 10.1), white on black at 32x32 like tiny-digits' data.

    python style_set.py --out build/typed [--per-digit 5]

Writes name.png files and a metadata.jsonl with, per image, a caption ("a typed seven": the trigger word
is already in it) and the class id, so the same folder trains tiny-digits-text (captions) and tiny-digits
(labels). At most 50 images (10 digits x --per-digit <= 5).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SIDE = 32
# (font size, stroke width, dx, dy): one typeface, a few sizes and weights, small offsets
VARIANTS = [(34, 1, 0, 0), (32, 1, -1, 1), (36, 1, 1, -1), (30, 1, 0, -1), (34, 2, 0, 1)]


def render(digit: int, size: int, stroke: int, dx: int = 0, dy: int = 0) -> np.ndarray:
    """(32, 32) uint8: the numeral, centred on its ink bounding box, white on black."""
    font = ImageFont.load_default(size=size)
    img = Image.new("L", (SIDE, SIDE), 0)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font, stroke_width=stroke)
    x = (SIDE - (right - left)) / 2 - left + dx
    y = (SIDE - (bottom - top)) / 2 - top + dy
    draw.text((x, y), str(digit), fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    return np.asarray(img)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-digit", type=int, default=5, help="variants per digit (<= 5: at most 50 images)")
    args = p.parse_args(argv)
    if not 1 <= args.per_digit <= len(VARIANTS):
        raise SystemExit(f"--per-digit must be in 1..{len(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for d in range(10):
        for v, (size, stroke, dx, dy) in enumerate(VARIANTS[:args.per_digit]):
            name = f"{d}-{v}.png"
            Image.fromarray(render(d, size, stroke, dx, dy)).convert("RGB").save(args.out / name)
            rows.append({"file_name": name, "text": f"a typed {WORDS[d]}", "label": d})
    (args.out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps({"out": str(args.out), "images": len(rows), "font": ImageFont.load_default(size=32).getname()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
