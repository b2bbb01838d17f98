"""Regenerate docs/benchmarks.md: every figure in it comes from a `ditkit bench` command this script runs.

    .venv/bin/python docs/benchmarks.py [--threads N] [--cache out/bench-archs] [--out docs/benchmarks.md]
                                        [--only tiny-digits,dit-xl-2-256-variants,...]

(`make bench` runs it.) It writes the full-size random-weight architectures into --cache once
(tools/archs.py; about 5.5 GB), runs each bench with --json, keeps the JSON next to them, and
renders the tables from that JSON under the exact command that produced it. CUDA runs are added when
torch sees a GPU; otherwise the CUDA section says they were not measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PIXART_TOKENS = 120  # PixArt-alpha's T5 max_sequence_length

# DiT-XL/2 on CPU: a small calibration set (one trajectory of 4 steps; depth scoring is hours otherwise)
XL_CALIB = ["--calib-samples", "1", "--calib-steps", "4", "--calib-points", "2", "--no-timing"]

# variant name -> the ditkit command that builds it into {cache}/variants/NAME (once; skipped when present)
VARIANTS = {
    "td-depth50": ["prune", "tiny-digits", "--method", "depth", "--ratio", "0.5"],
    "td-width50": ["prune", "tiny-digits", "--method", "width", "--ratio", "0.5", "--no-timing"],
    "td-magnitude40": ["prune", "tiny-digits", "--method", "magnitude", "--sparsity", "0.4", "--no-timing"],
    "td-recovered": ["distill", "{cache}/variants/td-depth50", "--mode", "recover"],
    "td-steps4": ["distill", "tiny-digits", "--mode", "steps", "--student-steps", "4", "--validate-every", "250"],
    "td-int8": ["quantize", "tiny-digits", "--scheme", "int8-dynamic"],
    "td-nf4": ["quantize", "tiny-digits", "--scheme", "bnb-nf4"],
    "td-onnx": ["export", "tiny-digits"],
    "td-cache15": ["cache", "tiny-digits", "--target-speedup", "1.5"],
    "td-feedback": ["distill", "tiny-digits", "--mode", "feedback"],
    # the personalization benchmark's adapter (docs/examples/personalize defaults), fused into a bundle; {out}
    # places the output where the command does not take it as -o
    "tdt-typed-fused": ["lora-train", "tiny-digits-text", "--data", "{cache}/typed", "--trigger", "typed",
                        "--steps", "1000", "--lr", "3e-3", "-o", "{out}.safetensors", "--fuse-into", "{out}"],
    "xl-depth50": ["prune", "{cache}/dit-xl-2-256", "--method", "depth", "--ratio", "0.5", *XL_CALIB],
    "xl-width30": ["prune", "{cache}/dit-xl-2-256", "--method", "width", "--ratio", "0.3", *XL_CALIB],
    "xl-int8": ["quantize", "{cache}/dit-xl-2-256", "--scheme", "int8-dynamic"],
    "xl-onnx": ["export", "{cache}/dit-xl-2-256"],
}
V = "{cache}/variants/"
HANDWRITTEN = [a for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
               for a in ("--prompt", f"a handwritten {w}")]  # tiny-digits-text's own prompts
XL_CPU = ["--batch-sizes", "1", "--warmup", "0", "--repeats", "3", "--num-images", "0"]

# title, what it shows, bench arguments ({cache} is filled in); CPU runs
CPU_RUNS = [
    ("tiny-digits", "tiny-digits against itself (the embedded default, with its judge)",
     "The method's self-check: the same model twice must give speedups of 1.0 within noise and identical "
     "images (PSNR capped at 100 dB, SSIM 1).",
     ["tiny-digits", "tiny-digits", "--batch-sizes", "1,8"]),
    ("tiny-digits-variants", "tiny-digits and its variants (prune, quantize, export)",
     "Every op on the default, in one run against the base: pruned without retraining, quantized, and "
     "the ONNX graph run by onnxruntime. Quality on 100 identical seeds, scored by the model's judge.",
     ["tiny-digits", *(V + n for n in ("td-depth50", "td-width50", "td-magnitude40", "td-int8", "td-nf4",
                                       "td-onnx")), "--batch-sizes", "1,8"]),
    ("tiny-digits-distilled", "tiny-digits: depth-pruned, then recovered; a 4-step student",
     "Distillation on CPU (docs/distill.md): the depth-pruned student before and after `--mode recover`, "
     "and a 4-step student at its own 4 steps against the base at 25. Quality on 100 identical seeds.",
     ["tiny-digits", *(V + n for n in ("td-depth50", "td-recovered", "td-steps4")), "--batch-sizes", "1,8"]),
    ("tiny-digits-accelerated", "tiny-digits at its own 25 steps: step caching and feedback distillation",
     "Faster at the same sampler and step count (docs/accelerate.md): `ditkit cache` (training-free, calibrated "
     "to 1.5x) and `distill --mode feedback` (Inner Loop Feedback, default target). Batch 1, the per-image "
     "headline; quality on 100 identical seeds.",
     ["tiny-digits", *(V + n for n in ("td-cache15", "td-feedback")), "--batch-sizes", "1"]),
    ("tiny-digits-text-lora", "tiny-digits-text and its typed-style LoRA, fused",
     "The personalization adapter (docs/lora.md: rank 4 on the attention projections, 2.66% of the transformer, "
     "trained on the 50-image typed style set with trigger \"typed\") fused into the weights: same parameters "
     "and speed as the base. Quality on the base's own prompts (\"a handwritten seven\", no trigger) against "
     "the base on identical seeds shows how much the adapter changes what it was not asked for; bench has no "
     "judge for text models, the style and class scores come from `make -C docs/examples/personalize`.",
     ["tiny-digits-text", V + "tdt-typed-fused", *HANDWRITTEN, "--batch-sizes", "1"]),
    ("dit-xl-2-256-variants", "DiT-XL/2 256px, random weights, and its variants",
     "Speed and memory only: depth 0.5 and width 0.3 pruning, int8-dynamic, ONNX. Batch 1, 3 timed rounds.",
     ["{cache}/dit-xl-2-256", *(V + n for n in ("xl-depth50", "xl-width30", "xl-int8", "xl-onnx")), *XL_CPU]),
    ("tiny-digits-compile", "torch.compile on CPU: tiny-digits and its variants",
     "Every model eager and compiled (`--compile`, regional), interleaved in one run: pruned, quantized, ONNX, "
     "step caching and feedback. Speed only (--num-images 0).",
     ["tiny-digits", *(V + n for n in ("td-depth50", "td-int8", "td-nf4", "td-onnx", "td-cache15", "td-feedback")),
      "--compile", "--num-images", "0", "--batch-sizes", "1"]),
    ("dit-xl-2-256-compile", "torch.compile on CPU: DiT-XL/2 256px, regional",
     "The base and its depth-0.5 variant, eager and compiled regionally (the default). Batch 1, 3 timed rounds.",
     ["{cache}/dit-xl-2-256", V + "xl-depth50", "--compile", *XL_CPU]),
    ("dit-xl-2-256-compile-full", "torch.compile on CPU: DiT-XL/2 256px, full graph",
     "The same, compiled as one graph per model (`--compile-mode full`).",
     ["{cache}/dit-xl-2-256", V + "xl-depth50", "--compile", "--compile-mode", "full", *XL_CPU]),
    ("pixart-alpha-512", "PixArt-alpha 512px, random weights (bare transformer)",
     f"Conditioned on random T5-shaped embeddings of {PIXART_TOKENS} tokens (PixArt-alpha's prompt length). "
     "CPU: batch 1 only, one FLOP-count call then 3 timed rounds.",
     ["{cache}/pixart-alpha-512", "--embeddings", "{cache}/pixart-t5-120.safetensors", "--batch-sizes", "1",
      "--warmup", "0", "--repeats", "3", "--num-images", "0"]),
]
CUDA_RUNS = [
    ("tiny-digits", "tiny-digits against itself", "", ["tiny-digits", "tiny-digits", "--batch-sizes", "1,8"]),
    ("dit-xl-2-256", "DiT-XL/2 256px, random weights, bf16", "",
     ["{cache}/dit-xl-2-256", "--batch-sizes", "1,8,32", "--num-images", "0", "--dtype", "bf16"]),
    ("pixart-alpha-512", "PixArt-alpha 512px, random weights, bf16", "",
     ["{cache}/pixart-alpha-512", "--embeddings", "{cache}/pixart-t5-120.safetensors", "--batch-sizes", "1,8",
      "--num-images", "0", "--dtype", "bf16"]),
]


def cpu_name() -> str:
    """The machine a CPU section ran on, e.g. '2-core AMD EPYC with AVX512-BF16/VNNI' (from /proc/cpuinfo)."""
    import os
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = " ".join(w for w in value.split() if not w[0].isdigit() and "-Core" not in w
                                 and w not in ("Processor", "CPU"))[:40]
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    extras = [name for flag, name in (("avx512_bf16", "BF16"), ("avx512_vnni", "VNNI")) if flag in flags]
    return f"{os.cpu_count()}-core {model}" + (f" with AVX512-{'/'.join(extras)}" if extras else "")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(cache: Path, names: set[str]) -> None:
    """The random-weight architectures, the PixArt embeddings and the LoRA style set, written once into `cache`."""
    from ditkit.formats.embeddings import save_embeddings

    cache.mkdir(parents=True, exist_ok=True)
    if any("lora" in k for k in names) and not (cache / "typed" / "metadata.jsonl").is_file():
        log(f"writing {cache / 'typed'}")
        subprocess.run([sys.executable, str(ROOT / "docs" / "examples" / "personalize" / "style_set.py"), "--out",
                        str(cache / "typed")], check=True, stdout=subprocess.DEVNULL)
    for name in ("dit-xl-2-256", "pixart-alpha-512"):
        if any(k.startswith(name) for k in names) and not (cache / name / "config.json").is_file():
            log(f"writing {cache / name}")
            subprocess.run([sys.executable, str(ROOT / "tools" / "archs.py"), name, "--out", str(cache / name)],
                           check=True)
    emb = cache / "pixart-t5-120.safetensors"
    if "pixart-alpha-512" in names and not emb.is_file():
        g = torch.Generator().manual_seed(0)
        rows = {"prompt_embeds": torch.randn(1, PIXART_TOKENS, 4096, generator=g) * 0.1,
                "prompt_attention_mask": torch.ones(1, PIXART_TOKENS, dtype=torch.long)}
        save_embeddings(emb, ["random T5-shaped embedding"], rows, {k: v.clone() for k, v in rows.items()})


def build_variants(args: list[str], cache: Path, full: Path) -> list[str]:
    """Build the variants a run names (ditkit prune/quantize/export/...); returns the commands that built them."""
    commands = []
    for a in args:
        if not a.startswith(V):
            continue
        name = a[len(V):]
        out = V.format(cache=cache) + name
        spec = VARIANTS[name]
        argv = ["ditkit", *[x.format(cache=cache, out=out) for x in spec]]
        if not any("{out}" in x for x in spec):
            argv += ["-o", out]
        commands.append(" ".join(shlex.quote(x) for x in argv))
        if not (full / "variants" / name).exists():
            log(f"$ {commands[-1]}")
            p = subprocess.run([str(BIN / "ditkit"), *argv[1:]], cwd=ROOT, capture_output=True, text=True)
            if p.returncode != 0:
                sys.stderr.write(p.stderr)
                raise SystemExit(f"building {name} failed (exit {p.returncode}): {commands[-1]}")
    return commands


def run(args: list[str], extra: list[str], cache: Path, store: Path, key: str, reuse: bool) -> tuple[str, dict, str]:
    """(the command, its JSON report, when it ran); with `reuse`, a stored result of the identical command."""
    argv = ["ditkit", "bench", *[a.format(cache=cache) for a in args], *extra, "--json"]
    command = " ".join(shlex.quote(a) for a in argv)
    stored = store / f"{key}.json"
    if reuse and stored.is_file():
        rec = json.loads(stored.read_text())
        if rec.get("command") == command:
            log(f"reusing {stored} ({rec['ran']}): {command}")
            return command, rec["report"], rec["ran"]
    log(f"$ {command}")
    p = subprocess.run([str(BIN / "ditkit"), *argv[1:]], cwd=ROOT, capture_output=True, text=True)
    sys.stderr.write(p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"benchmark failed (exit {p.returncode}): {command}")
    ran = datetime.datetime.now().isoformat(timespec="minutes")
    stored.write_text(json.dumps({"command": command, "ran": ran, "report": json.loads(p.stdout)}, indent=1))
    return command, json.loads(p.stdout), ran


def main(argv: list[str] | None = None) -> int:
    from ditkit.cli.bench_render import markdown

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("out/bench-archs"), help="where the random-weight models go")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--threads", type=int, default=None, help="passed to every bench as --threads")
    ap.add_argument("--only", default=None, help="comma-separated run keys (default: all)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the stored result of an identical command (in CACHE/results) instead of re-running it")
    a = ap.parse_args(argv)
    keys = set(a.only.split(",")) if a.only else {k for k, *_ in CPU_RUNS}
    cache = a.cache  # as given: commands run in the repository root, and are quoted that way
    full = cache if cache.is_absolute() else ROOT / cache
    prepare(full, keys)
    store = full / "results"
    store.mkdir(parents=True, exist_ok=True)
    extra = ["--threads", str(a.threads)] if a.threads else []
    script = "python docs/benchmarks.py" + (f" --threads {a.threads}" if a.threads else "") + \
        (" --reuse" if a.reuse else "")

    out = ["# Benchmarks", "",
           f"Rendered by `{script}` (`make bench`); each section names the date it ran and the machine in its "
           "environment line. Every table below is "
           "rendered from the JSON printed by the `ditkit bench` command quoted above it; re-run the script "
           "to reproduce them on your machine. How to read them: [bench.md](bench.md).", "",
           "- **ms/step**: one transformer call on the rows one sampler step needs (2 x batch with "
           "classifier-free guidance), median of the timed rounds (p90 in brackets).",
           "- **ms/image**: denoise + VAE decode at the model's own sampler and step count, per image.",
           "- **MFU**: FLOPs of the timed call (torch's FlopCounterMode, attention included on CPU too: "
           "ops/flops.py) per second, over the dense matmul peak that the same run measured on the same device.",
           "- **peak memory**: weights in memory + the call's peak growth (CPU: resident set; CUDA: allocated).",
           "- DiT-XL/2 in diffusers' layout has 749.8M parameters, not the original 675M: every block carries "
           "its own copy of the timestep and label embedders.", ""]
    out += [f"## CPU ({cpu_name()})", ""]
    for key, title, about, args in CPU_RUNS:
        if key not in keys:
            continue
        built = build_variants(args, cache, full)
        command, doc, ran = run(args, extra, cache, store, f"cpu-{key}", a.reuse)
        out += [f"### {title}", "", f"{about} Ran {ran}.", ""]
        if built:
            out += ["The variants were built with:", "", "```sh", *built, "```", ""]
        out += [markdown(doc, command=command), ""]
    out += ["## CUDA", ""]
    if torch.cuda.is_available():
        for key, title, about, args in CUDA_RUNS:
            if key not in keys:
                continue
            command, doc, ran = run(args, ["--device", "cuda"], cache, store, f"cuda-{key}", a.reuse)
            out += [f"### {title}", "", f"Ran {ran}.", "", markdown(doc, command=command), ""]
    else:
        out += ["**Not measured in this run**: torch saw no CUDA device on the machine that ran the script. "
                "On a GPU machine the same script adds DiT-XL/2 and PixArt-alpha in bf16 at batch sizes "
                "1, 8 (and 32 for DiT-XL/2), and tiny-digits, with `--device cuda` (CUDA events, "
                "max_memory_allocated, a bf16 matmul peak). `make bench-cuda` (tools/bench_cuda.py, "
                "[cuda.md](cuda.md)) is the one-shot run for a GPU machine: the GPU tests, then DiT-XL/2 and "
                "PixArt-alpha 1024px in bf16 against their pruned, int8, fp8 and nf4 variants, in 8 minutes; "
                "no GPU has run it yet.", ""]
    a.out.write_text("\n".join(out).rstrip() + "\n")
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
