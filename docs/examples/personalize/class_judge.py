"""The class judge of the personalization benchmark: a digit classifier (0-9) that knows both handwritten and
typed digits, trained here, reproducibly, and saved in ditkit's judge layout (ditkit.formats.judge).

    python class_judge.py --model tiny-digits-text --out build/class-judge [--steps 800]

Why not the model's own judge: tiny-digits' judge was trained on handwritten digits only and misreads typed
ones (on the real style set it is right 0.76 of the time, and calls every typed 6 a 0), so it cannot tell
whether a typed sample shows the requested digit. This judge trains on:
  - handwritten: the same sklearn digits split tiny-digits' judge trains on (gen-train, 70%),
  - typed: digits rendered with the style set's font (Pillow's default, style_set.render) at sizes and
    stroke widths that are NOT the style set's, nor the held-out ones below, at several offsets;
both raw and through the model's VAE (encode -> decode), as generated images come out of it, with the same
affine jitter and noise as the style judge. The style set itself is never trained on.

Reported on stdout (JSON): accuracy on held-out handwritten digits (the 30% nobody trains on) and on typed
digits rendered with held-out sizes, strokes and offsets (style_judge.py's unseen variants), raw and
through the VAE, and, for information, on the style set itself.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[3] / "tools"))  # tiny_digits: the default's build script
import tiny_digits as td  # noqa: E402
from style_judge import HELD_OUT_VARIANTS, rendered, round_trip  # noqa: E402
from style_set import VARIANTS  # noqa: E402

ARCH = {"arch": "cnn3", "in_channels": 3, "image_size": 32, "channels": [32, 64, 64], "feature_dim": 64,
        "num_classes": 10, "dropout": 0.2}  # tiny-digits' judge architecture
SIZES = range(26, 39)
STROKES = (0, 1, 2)
OFFSETS = (-2, 0, 2)


def training_variants() -> list[tuple[int, int, int, int]]:
    """(size, stroke, dx, dy) of the typed training renders: no (size, stroke) of the style set or of the
    held-out renders."""
    taken = {(s, w) for s, w, _, _ in (*VARIANTS, *HELD_OUT_VARIANTS)}
    return [(s, w, dx, dy) for s in SIZES for w in STROKES if (s, w) not in taken
            for dx in OFFSETS for dy in OFFSETS]


def accuracy(judge, x: torch.Tensor, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = torch.cat([judge(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)]).numpy()
    return round(float((pred == y).mean()), 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-digits-text", help="whose VAE generated images come through")
    p.add_argument("--typed", type=Path, default=None, help="the style set, only to report accuracy on it")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    from ditkit.formats.layouts import load_bundle
    from ditkit.formats.judge import save_judge
    from ditkit.ops.judge import Judge, feature_stats, judge_features

    td.seed_everything(args.seed, args.threads)
    t0 = time.time()
    vae = load_bundle(args.model).vae
    torch.manual_seed(args.seed)  # again: building the model drew from the RNG, differently per family
    hand = td.load_split(args.seed)
    variants = training_variants()
    x_t, y_t = rendered(variants)
    # 1. training pools, each raw + through the VAE
    x_hand = torch.cat([hand["x_train"], round_trip(vae, hand["x_train"])])
    y_hand = torch.from_numpy(np.concatenate([hand["y_train"]] * 2))
    x_typed = torch.cat([x_t, round_trip(vae, x_t)])
    y_typed = torch.from_numpy(np.concatenate([y_t] * 2))
    # 2. train: half of every batch handwritten, half typed
    judge = Judge(ARCH)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    judge.train()
    half = args.batch // 2
    for step in range(args.steps):
        td.set_lr(opt, td.cosine_lr(step, args.steps, 2e-3, warmup=50, floor=0.02))
        a = torch.randint(0, len(x_hand), (half,))
        b = torch.randint(0, len(x_typed), (half,))
        x = torch.cat([td.augment(x_hand[a]), td.augment(x_typed[b], max_rot_deg=6, scale=(0.93, 1.07),
                                                         max_shift=0.06)])
        x = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
        y = torch.cat([y_hand[a], y_typed[b]])
        loss = F.cross_entropy(judge(x), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    judge.eval()
    # 3. held-out: handwritten digits nobody trained on; typed renders at unseen sizes, strokes and offsets
    x_un, y_un = rendered(HELD_OUT_VARIANTS)
    report = {
        "handwritten_held_out": accuracy(judge, hand["x_held"], hand["y_held"]),
        "handwritten_held_out_vae": accuracy(judge, round_trip(vae, hand["x_held"]), hand["y_held"]),
        "typed_held_out": accuracy(judge, x_un, y_un),
        "typed_held_out_vae": accuracy(judge, round_trip(vae, x_un), y_un),
        "n_handwritten_held_out": int(hand["n_held"]), "n_typed_held_out": int(len(y_un)),
        "typed_training_variants": len(variants), "handwritten_training_images": int(hand["n_train"]),
    }
    if args.typed is not None:
        from style_judge import load_typed

        from ditkit.formats.datasets import read_image_folder

        x_s = load_typed(args.typed)
        y_s = np.asarray(read_image_folder(args.typed, size=(32, 32)).labels)
        report.update(style_set=accuracy(judge, x_s, y_s), style_set_vae=accuracy(judge, round_trip(vae, x_s), y_s))
    report.update(final_loss=round(loss.item(), 4), steps=args.steps, seconds=round(time.time() - t0, 1),
                  params=sum(p.numel() for p in judge.parameters()))
    feats, _ = judge_features(judge, hand["x_held"])
    judge.set_reference(*feature_stats(feats))
    save_judge(judge, dir=args.out, extra={"classes": [str(d) for d in range(10)], "model_vae": args.model,
                                           "report": report})
    print(json.dumps({"out": str(args.out), **report}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
