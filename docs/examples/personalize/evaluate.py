"""Score the personalization run; the last line printed is one JSON document.

    python evaluate.py --styled build/M/with-lora --style-judge build/M/style-judge \
                       --before build/M/base-before --after build/M/base-after [--train build/M/train.json]

style_rate      share of the adapter's samples (--styled, made by `ditkit generate --lora`) that the style
                judge calls typed
class_accuracy  the digit judge's class accuracy on those samples, from their generate.json (the model's own
                judge, scored by ditkit generate against the requested digits)
base_unchanged  the base model's samples without the adapter after training (--after) are bit-identical to
                the ones made before training (--before), same seeds and settings
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--styled", type=Path, required=True)
    p.add_argument("--style-judge", type=Path, required=True)
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--train", type=Path, default=None, help="lora-train's --json output (adapter size, time)")
    args = p.parse_args(argv)

    from ditkit.formats.images import SIDECAR, read_images
    from ditkit.formats.judge import load_judge
    from ditkit.ops.judge import images_to_tensor

    judge = load_judge(args.style_judge).judge
    styled = read_images(args.styled)
    with torch.no_grad():
        typed = judge(images_to_tensor(styled)).argmax(1) == 1
        base_typed = judge(images_to_tensor(read_images(args.after))).argmax(1) == 1
    sidecar = json.loads((args.styled / SIDECAR).read_text())
    digit = sidecar["report"].get("judge") or {}
    before, after = read_images(args.before), read_images(args.after)
    doc = {
        "style_rate": round(float(typed.float().mean()), 4),
        "class_accuracy": digit.get("accuracy"),
        "base_unchanged": bool(before.shape == after.shape and np.array_equal(before, after)),
        "n": int(len(styled)),
        "base_style_rate": round(float(base_typed.float().mean()), 4),
        "fd": digit.get("fd"),
        "conditions": sorted(set(map(str, sidecar["report"]["conditions"])))[:10],
    }
    if args.train is not None and args.train.is_file():
        t = json.loads(args.train.read_text())
        doc.update(adapter_fraction=t.get("adapter_fraction"), rank=t.get("rank"), alpha=t.get("alpha"),
                   train_steps=t.get("steps"), train_seconds=t.get("seconds"))
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
