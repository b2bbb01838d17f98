"""The style judge: a small CNN that tells handwritten digits (tiny-digits' data) from typed ones (the style
set), trained here, reproducibly, and saved in ditkit's judge layout (ditkit.formats.judge).

    python style_judge.py --typed build/typed --model tiny-digits-text --out build/style-judge [--steps 600]

Class 0 = handwritten, 1 = typed. Generated images come out of the model's VAE, so the judge also trains
on VAE round trips (encode -> decode) of both kinds; typed images are augmented (small affine jitter) before
their round trip. Reported on stdout (JSON): accuracy on held-out handwritten digits and on typed digits
rendered with sizes and offsets the style set does not use, raw and through the VAE.
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
from style_set import render  # noqa: E402

ARCH = {"arch": "cnn3", "in_channels": 3, "image_size": 32, "channels": [16, 32, 32], "feature_dim": 32,
        "num_classes": 2, "dropout": 0.2}
HELD_OUT_VARIANTS = [(31, 1, 1, 0), (35, 1, -1, -1), (33, 1, 0, 1), (33, 2, -1, 0)]


def load_typed(root: Path) -> torch.Tensor:
    from ditkit.formats.datasets import read_image_folder

    folder = read_image_folder(root, size=(32, 32))
    return torch.from_numpy(folder.images).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, 32, 32) in [0, 1]


@torch.no_grad()
def round_trip(vae, x01: torch.Tensor, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(x01), batch):
        z = vae.encode(x01[i:i + batch] * 2 - 1).latent_dist.mean
        out.append((vae.decode(z).sample / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def rendered(variants) -> tuple[torch.Tensor, np.ndarray]:
    imgs = [render(d, *v) for v in variants for d in range(10)]
    x = torch.from_numpy(np.stack(imgs)).float().div(255.0)[:, None].expand(-1, 3, -1, -1).contiguous()
    return x, np.array([d for _ in variants for d in range(10)])


def typed_rate(judge, x) -> float:
    with torch.no_grad():
        return round(float((judge(x).argmax(1) == 1).float().mean()), 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--typed", type=Path, required=True, help="the style set (style_set.py)")
    p.add_argument("--model", default="tiny-digits-text", help="whose VAE generated images come through")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    from ditkit.formats.layouts import load_bundle
    from ditkit.formats.judge import save_judge
    from ditkit.ops.judge import Judge, feature_stats, judge_features

    td.seed_everything(args.seed, args.threads)
    t0 = time.time()
    vae = load_bundle(args.model).vae
    torch.manual_seed(args.seed)  # again: building the model drew from the RNG, differently per family
    hand = td.load_split(args.seed)
    typed = load_typed(args.typed)
    # 1. training pool: raw and VAE round trips, typed augmented 8x before its round trip
    typed_aug = torch.cat([td.augment(typed, max_rot_deg=6, scale=(0.93, 1.07), max_shift=0.06) for _ in range(8)])
    x_typed = torch.cat([typed, typed_aug, round_trip(vae, typed), round_trip(vae, typed_aug)])
    x_hand = torch.cat([hand["x_train"], round_trip(vae, hand["x_train"])])
    # 2. train, balanced batches
    judge = Judge(ARCH)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    judge.train()
    for step in range(args.steps):
        td.set_lr(opt, td.cosine_lr(step, args.steps, 2e-3, warmup=30, floor=0.05))
        a = x_hand[torch.randint(0, len(x_hand), (32,))]
        b = x_typed[torch.randint(0, len(x_typed), (32,))]
        x = torch.cat([td.augment(a), td.augment(b, max_rot_deg=4, scale=(0.95, 1.05), max_shift=0.04)])
        x = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
        y = torch.cat([torch.zeros(32, dtype=torch.long), torch.ones(32, dtype=torch.long)])
        loss = F.cross_entropy(judge(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    judge.eval()
    # 3. held-out: handwritten digits nobody trained on, typed digits in unseen sizes/offsets
    x_unseen, _ = rendered(HELD_OUT_VARIANTS)
    report = {
        "handwritten_held_out_called_typed": typed_rate(judge, hand["x_held"]),
        "handwritten_held_out_vae_called_typed": typed_rate(judge, round_trip(vae, hand["x_held"])),
        "typed_unseen_called_typed": typed_rate(judge, x_unseen),
        "typed_unseen_vae_called_typed": typed_rate(judge, round_trip(vae, x_unseen)),
        "final_loss": round(loss.item(), 6), "steps": args.steps, "seconds": round(time.time() - t0, 1),
        "params": sum(p.numel() for p in judge.parameters()),
    }
    feats, _ = judge_features(judge, x_typed)
    judge.set_reference(*feature_stats(feats))
    save_judge(judge, dir=args.out, extra={"classes": ["handwritten", "typed"], "model_vae": args.model,
                                           "typed_set": str(args.typed), "report": report})
    print(json.dumps({"out": str(args.out), **report}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
