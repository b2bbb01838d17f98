"""The cache-methods table and plot of docs/accelerate.md: every method calibrated to each target, benched in one run.

    .venv/bin/python docs/cache_table.py [--models tiny-digits,tiny-digits-text] [--targets 1.5,2,2.5]
        [--methods auto,forecast,...] [--work out/cache-table] [--plot docs/cache-methods.svg] [--caption TEXT]

For each model and target it runs `ditkit cache MODEL -o WORK/MODEL-METHOD-TARGET --method METHOD
--target-speedup TARGET --threads 1` for every method (a method that cannot reach the target exits 2 and is
listed as such), then one `ditkit bench MODEL <every output> --threads 1 --json` per model and target, and
prints the markdown table (speedup per image, PSNR/SSIM vs the uncached images on the same seeds, judge
accuracy, FD) under the commands that made it; the plot (docs/cache_plot.py) is PSNR against bench's speedup per
image for every method, from every bench report in WORK.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
METHODS = ("auto", "forecast", "teacache", "blocks", "fbcache", "magcache", "taylorseer", "pab")


def sh(args: list[str]) -> subprocess.CompletedProcess:
    print("$ " + shlex.join(args), file=sys.stderr)
    return subprocess.run(args, capture_output=True, text=True)


def _reason(stderr: str) -> str:
    """The method's own reason from the command's one `Error:` line (inside its parentheses when it has them)."""
    line = next((l for l in reversed(stderr.strip().splitlines()) if l.startswith("Error: ")), stderr.strip()[-200:])
    inner = line[line.find("(") + 1:line.rfind(")")] if "(" in line and ")" in line else line
    return inner.split(": ", 1)[1] if inner.startswith(tuple(METHODS)) and ": " in inner else inner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny-digits,tiny-digits-text")
    ap.add_argument("--targets", default="1.5,2,2.5")
    ap.add_argument("--methods", default=",".join(m for m in METHODS if m != "blocks"))
    ap.add_argument("--work", type=Path, default=Path("out/cache-table"))
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="keep cache outputs already in --work")
    ap.add_argument("--caption", default="", help="the plot's caption (its commands, machine and date)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    rows, commands = [], []
    for model in a.models.split(","):
        for target in a.targets.split(","):
            outs = {}
            for m in a.methods.split(","):
                out = a.work / f"{model}-{m}-{target}"
                commands_cache = [str(BIN / "ditkit"), "cache", model, "-o", str(out), "--method", m, "--target-speedup", target,
                       "--threads", "1", "--json", "--force"]
                cmd = commands_cache
                commands.append(shlex.join(["ditkit", *cmd[1:]]))
                if a.reuse and (out / "ditkit.json").exists():
                    doc = json.loads((out / "ditkit.json").read_text())["report"]
                    outs[m] = (out, doc["method"], doc["params"])
                    continue
                r = sh(cmd)
                if r.returncode == 0:
                    doc = json.loads(r.stdout)
                    outs[m] = (out, doc["method"], doc["params"])
                else:
                    rows.append({"model": model, "target": target, "method": m, "error": _reason(r.stderr)})
            if not outs:
                continue
            prompts = []  # text models: bench's quality images over the model's own prompts
            for p in json.loads((ROOT / "formats" / "assets" / model / "ditkit.json").read_text()).get(
                    "defaults", {}).get("prompts", []) if (ROOT / "formats" / "assets" / model).exists() else []:
                prompts += ["--prompt", p]
            cmd = [str(BIN / "ditkit"), "bench", model, *[str(o[0]) for o in outs.values()], *prompts, "--threads", "1",
                   "--json"]
            commands.append(shlex.join(["ditkit", *cmd[1:]]))
            r = sh(cmd)
            if r.returncode not in (0, 1):
                raise SystemExit(r.stderr)
            doc = json.loads(r.stdout)
            (a.work / f"bench-{model}-{target}.json").write_text(r.stdout)
            variants = [m for m in doc["models"] if m["role"] != "base"]
            base = next(m for m in doc["models"] if m["role"] == "base")
            for (m, (_, kept, _p)), v in zip(outs.items(), variants):
                q, bq = v["quality"] or {}, base["quality"] or {}
                rows.append({"model": model, "target": target, "method": m if m != "auto" else f"auto ({kept})",
                             "speedup": v["speedup_per_image"], "psnr": q.get("psnr"), "ssim": q.get("ssim"),
                             "accuracy": q.get("judge_accuracy"), "base_accuracy": bq.get("judge_accuracy"),
                             "fd": q.get("judge_fd"), "base_fd": bq.get("judge_fd")})
    print("| model | target | method | speedup per image | PSNR vs base (dB) | SSIM | judge accuracy (base) | FD (base) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['target']}x | {r['method']} | not reached: {r['error']} | | | | |")
            continue
        f = lambda v, n=3: "-" if v is None else f"{v:.{n}f}"  # noqa: E731
        print(f"| {r['model']} | {r['target']}x | {r['method']} | {f(r['speedup'], 2)}x | {f(r['psnr'], 1)} | "
              f"{f(r['ssim'])} | {f(r['accuracy'], 2)} ({f(r['base_accuracy'], 2)}) | {f(r['fd'], 2)} "
              f"({f(r['base_fd'], 2)}) |")
    print("\ncommands:\n" + "\n".join(commands))
    (a.work / "rows.json").write_text(json.dumps(rows, indent=1))
    if a.plot is not None:  # docs/cache_plot.py: PSNR against speedup per image, from the bench reports
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import cache_plot

        reports = [json.loads(p.read_text()) for p in sorted(a.work.glob("bench-*.json"))]
        cache_plot.plot(cache_plot.points(reports), a.plot, a.caption)

if __name__ == "__main__":
    main()
