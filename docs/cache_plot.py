"""PSNR against speedup per image for every cache method, from `ditkit bench --json` reports (docs/accelerate.md).

    .venv/bin/python docs/cache_plot.py OUT.svg BENCH.json [BENCH.json ...] [--caption TEXT]

Each bench report is one base and its cached variants (docs/cache_table.py writes one per model and target:
WORK/bench-MODEL-TARGET.json). A variant's method is the one it was asked for (`--method` in its manifest's
config: `auto` stays `auto`), so every method is one line through its targets; one panel per base model. The
caption (the commands, the machine and the date) is printed under the panels. The reports behind
docs/cache-methods.svg are in docs/data/cache-methods/ (their variants' manifests are not: a variant's method is
then read from cache_table's name, MODEL-METHOD-TARGET).
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path


def points(reports: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """model -> method -> [(speedup per image, PSNR vs base)], sorted by speedup."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for doc in reports:
        base = next(m for m in doc["models"] if m["role"] == "base")
        for v in doc["models"]:
            q = v.get("quality") or {}
            if v["role"] == "base" or q.get("psnr") is None or v.get("speedup_per_image") is None:
                continue
            manifest = Path(v["path"]) / "ditkit.json"
            doc_m = json.loads(manifest.read_text()) if manifest.exists() else {}
            named = re.fullmatch(rf"{re.escape(base['name'])}-(\w+)-[\d.]+", v["name"])  # cache_table's MODEL-M-T
            asked = ((doc_m.get("config") or {}).get("method") or (named.group(1) if named else None)
                     or (doc_m.get("cache") or {}).get("method", v["name"]))
            out[base["name"]][asked].append((float(v["speedup_per_image"]), float(q["psnr"])))
    return {m: {k: sorted(p) for k, p in by.items()} for m, by in out.items()}


def plot(pts: dict, path: Path, caption: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted(pts)
    colors = {n: f"C{i}" for i, n in enumerate(sorted({n for by in pts.values() for n in by}))}  # same in every panel
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for name in sorted(pts[model]):
            xs, ys = zip(*pts[model][name])
            ax.plot(xs, ys, marker="o", color=colors[name], lw=2.5 if name in ("auto", "forecast") else 1.2, label=name)
        ax.set_title(model)
        ax.set_xlabel("speedup per image (CPU time, 1 thread; bench)")
        ax.set_ylabel("PSNR vs the uncached images (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, va="bottom", ha="left", wrap=True)
        fig.subplots_adjust(bottom=0.24)
    fig.savefig(path, bbox_inches="tight", metadata={"Date": None})  # SVG: text, diffable; no date so reruns match
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("reports", type=Path, nargs="+")
    ap.add_argument("--caption", default="")
    a = ap.parse_args()
    plot(points([json.loads(p.read_text()) for p in a.reports]), a.out, a.caption)
    print(a.out)


if __name__ == "__main__":
    main()
