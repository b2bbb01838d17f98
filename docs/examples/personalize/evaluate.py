"""Score the personalization run; the last line printed is one JSON document.

    python evaluate.py --styled build/M/with-lora --style-judge build/M/style-judge \
                       --class-judge build/M/class-judge --before build/M/base-before \
                       --after build/M/base-after [--train build/M/train.json]

style_rate      share of the adapter's samples (--styled, made by `ditkit generate --lora`) that the style
                judge calls typed
class_accuracy  share of those samples that the class judge (class_judge.py: trained on handwritten AND
                typed digits, none of them the style set's) reads as the digit requested
class_accuracy_model_judge
                the same with the model's own digit judge (from the samples' generate.json): trained on
                handwritten digits only, it misreads typed ones (0.76 on the real style set), so it is
                reported, not used for the bar
untriggered_*   with --untriggered (text models): style rate and class accuracy of the adapter's samples on
                the base's own prompts ("a handwritten seven", no trigger word): how far the style leaks
base_unchanged  the base model's samples without the adapter after training (--after) are bit-identical to
                the ones made before training (--before), same seeds and settings
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_of(condition) -> int:
    """The digit a generate condition asks for: a class label, or the one number word of a prompt."""
    if isinstance(condition, int):
        return condition
    hits = [d for d, w in enumerate(WORDS) if w in str(condition).lower().split()]
    if len(hits) != 1:
        raise SystemExit(f"cannot tell which digit {condition!r} asks for")
    return hits[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--styled", type=Path, required=True)
    p.add_argument("--style-judge", type=Path, required=True)
    p.add_argument("--class-judge", type=Path, required=True)
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--untriggered", type=Path, default=None, help="adapter samples on prompts without the trigger")
    p.add_argument("--train", type=Path, default=None, help="lora-train's --json output (adapter size, time)")
    args = p.parse_args(argv)

    from ditkit.formats.images import SIDECAR, read_images
    from ditkit.formats.judge import load_judge
    from ditkit.ops.judge import images_to_tensor

    judge = load_judge(args.style_judge).judge
    classes = load_judge(args.class_judge).judge
    styled = read_images(args.styled)
    sidecar = json.loads((args.styled / SIDECAR).read_text())
    wanted = np.array([digit_of(c) for c in sidecar["report"]["conditions"]])
    with torch.no_grad():
        typed = judge(images_to_tensor(styled)).argmax(1) == 1
        base_typed = judge(images_to_tensor(read_images(args.after))).argmax(1) == 1
        read = classes(images_to_tensor(styled)).argmax(1).numpy()
    model_judge = sidecar["report"].get("judge") or {}
    before, after = read_images(args.before), read_images(args.after)
    doc = {
        "style_rate": round(float(typed.float().mean()), 4),
        "class_accuracy": round(float((read == wanted).mean()), 4),
        "base_unchanged": bool(before.shape == after.shape and np.array_equal(before, after)),
        "n": int(len(styled)),
        "styled_and_correct": round(float(((read == wanted) & typed.numpy()).mean()), 4),
        "class_accuracy_by_digit": [round(float((read[wanted == d] == d).mean()), 2) for d in range(10)],
        "class_accuracy_model_judge": model_judge.get("accuracy"),
        "base_style_rate": round(float(base_typed.float().mean()), 4),
        "fd_model_judge": model_judge.get("fd"),
        "conditions": sorted(set(map(str, sidecar["report"]["conditions"])))[:10],
    }
    if args.untriggered is not None:
        imgs = read_images(args.untriggered)
        conds = json.loads((args.untriggered / SIDECAR).read_text())["report"]["conditions"]
        with torch.no_grad():
            x = images_to_tensor(imgs)
            doc["untriggered_style_rate"] = round(float((judge(x).argmax(1) == 1).float().mean()), 4)
            right = classes(x).argmax(1).numpy() == np.array([digit_of(c) for c in conds])
        doc["untriggered_class_accuracy"] = round(float(right.mean()), 4)
    if args.train is not None and args.train.is_file():
        t = json.loads(args.train.read_text())
        doc.update(adapter_fraction=t.get("adapter_fraction"), rank=t.get("rank"), alpha=t.get("alpha"),
                   train_steps=t.get("steps"), train_seconds=t.get("seconds"))
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
